"""The studio page's static files (the `studio/` folder shipped in the package), served by the
HTTP/JSON adapter at GET `/` and `/studio/<name>`. A fixed table of names: no part of a request path
ever reaches the filesystem. The page uses only the public HTTP/JSON API (docs/serve.md)."""
from __future__ import annotations

from importlib import resources

_FILES = {"index.html": "text/html; charset=utf-8", "studio.js": "text/javascript; charset=utf-8",
          "studio.css": "text/css; charset=utf-8"}
# Same-origin only: no CDN, no inline script, images from the page's own data: and blob: URLs.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                      "base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def studio_asset(path: str) -> tuple[bytes, str] | None:
    """(body, content type) of the page file a GET path names, or None."""
    path = path.split("?", 1)[0]
    name = "index.html" if path in ("/", "/studio", "/studio/") else path.removeprefix("/studio/")
    if name not in _FILES:
        return None
    return resources.files(__package__).joinpath("studio", name).read_bytes(), _FILES[name]
