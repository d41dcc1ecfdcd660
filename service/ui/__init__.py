"""``GET /ui``: the page for people, with its static files and the server's icon; it talks to
the API like any client."""
