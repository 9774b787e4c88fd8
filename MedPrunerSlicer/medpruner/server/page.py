"""The web viewer's own files (`/` and `/web/...`): no data in them, so no token is needed for them.

Only the files named in `ASSETS` are served, from this package's `web/` folder; the niivue bundle is
copied into `web/vendor/` from the npm registry at install time (`web/package.json` at the repository
root), never committed. Without it, `/` says how to install it instead of failing.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response

WEB_DIR = Path(__file__).with_name("web")
NIIVUE_BUNDLE = WEB_DIR / "vendor" / "niivue.js"
# name in the URL -> (file, media type). A fixed list: nothing in a URL ever becomes a path.
ASSETS = {
    "app.js": (WEB_DIR / "app.js", "text/javascript"),
    "viewer.js": (WEB_DIR / "viewer.js", "text/javascript"),
    "api.js": (WEB_DIR / "api.js", "text/javascript"),
    "style.css": (WEB_DIR / "style.css", "text/css"),
    "niivue.js": (NIIVUE_BUNDLE, "text/javascript"),
}
# No inline script or style, no eval, no third-party origin; blob: only for the volumes handed to niivue.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self' blob:; worker-src 'self' blob:; font-src 'self' data:; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

NOT_INSTALLED = """<!doctype html><html><head><meta charset="utf-8"><title>MedPruner</title></head>
<body><h1>MedPruner server</h1><p>The web viewer's rendering library (niivue) is not installed, so the
page cannot be shown. Install it from the repository root with:</p>
<pre>cd web &amp;&amp; npm ci &amp;&amp; npm run build</pre>
<p>then reload this page. The HTTP API under <code>/v1</code> works without it.</p></body></html>"""


def is_page_path(path: str) -> bool:
    """Paths of the page itself, which the token guard lets through (they hold no data)."""
    return path == "/" or (path.startswith("/web/") and path[len("/web/"):] in ASSETS)


def install_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        if not NIIVUE_BUNDLE.is_file():
            return HTMLResponse(NOT_INSTALLED, status_code=503, headers=HEADERS)
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=HEADERS)

    @app.get("/web/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        path, media_type = ASSETS.get(name, (None, ""))
        if path is None or not path.is_file():
            return Response("not installed", status_code=404, media_type="text/plain", headers=HEADERS)
        return FileResponse(path, media_type=media_type, headers=HEADERS)
