"""What every request passes before a handler runs: connection limits, API keys, forwarded
headers, the access log, the JSON body parser and the one shape of every error."""
