"""The handlers and the response writers: the only room that turns an aiohttp request into typed
values (``service.http.asked``) and those values' results back into HTTP."""
