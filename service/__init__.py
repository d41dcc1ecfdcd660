"""The HTTP side of the SDXL-Lightning batch image API (aiohttp)."""

__version__ = "1.0.0"
