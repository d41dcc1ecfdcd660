"""``GET /ui``: a page for people, served by the server itself (``service/ui/static/ui``).

Plain HTML, CSS and one JavaScript module: no build step, nothing from a CDN, so it works on a box
with no internet. It talks only to this server (the Content-Security-Policy holds it to that): it
submits a job, follows ``GET /jobs/{id}``, shows the images through their links and downloads the
archive. The page and its files need no API key; the page asks for one when the API does. The
server's icon (``/favicon.ico``) lives here too.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp_apigami import docs

UI_FOLDER = Path(__file__).parent / "static" / "ui"
FAVICON = Path(__file__).parent / "static" / "favicon.ico"
FAVICON_PATH = "/favicon.ico"
UI_PATH = "/ui"
UI_STATIC = "/ui/static"
# Only this origin, for everything: scripts, styles, images, fetches (blob: for the zip download).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; connect-src 'self'; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@docs(
    tags=["info"],
    summary="A page to generate and download batches in a browser",
    operation_id="ui",
    security=[],
    responses={200: {"description": "The page (HTML; its script and style are under /ui/static/)", "content": {"text/html": {"schema": {"type": "string"}}}}},
)
async def ui_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(UI_FOLDER / "index.html", headers={**PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"})


async def favicon(request: web.Request) -> web.FileResponse:
    """Browsers ask every origin for /favicon.ico, with no key: a real icon (cached for a day) keeps a
    401 or 404 out of the console and the access log of a keyed server."""
    return web.FileResponse(FAVICON, headers={"Content-Type": "image/x-icon", "Cache-Control": "public, max-age=86400"})


async def page_file_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The page's own files carry the same headers (``on_response_prepare``: the static route
    takes none of its own)."""
    if request.path.startswith(UI_STATIC + "/"):
        response.headers.update(PAGE_HEADERS)


UI_ROUTES = [
    web.get(UI_PATH, ui_page, allow_head=False),
    web.static(UI_STATIC, UI_FOLDER, append_version=False),
    web.get(FAVICON_PATH, favicon, allow_head=False),
]
