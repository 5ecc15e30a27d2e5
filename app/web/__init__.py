"""The web dashboard (/ui) and the API docs (/docs), all served from files shipped in the
packages: no CDN, no build step, nothing fetched from another host.

The dashboard is plain HTML/JS/CSS under app/web/static/. It keeps the API key in the tab's
sessionStorage and sends it as `Authorization: Bearer ...` on every call (downloads too: a
fetch, then a blob), so a key is never part of a URL and never reaches an access log.
Swagger UI's assets come from the `fastapi-offline` package (the service extra). /redoc is not
served: ReDoc's bundle always loads its logo from cdn.redoc.ly, so it cannot be offline.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from app.schemas import BUILTIN_DATASETS, MODEL_FORMATS, ZOO_ARCHITECTURES
from mipp.config import METHODS

STATIC_DIR = Path(__file__).parent / "static"
UI_PATH = "/ui"
DOCS_ASSETS_PATH = "/docs-assets"
# The page may talk to its own origin only: a stolen-key script (XSS) could not send it
# anywhere, and nothing on the page can quietly depend on an outside host. blob: is how
# downloads and the sweep plot are shown after a fetch with the key in its header.
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


class DashboardFiles(StaticFiles):
    """StaticFiles with the dashboard's headers: its CSP, no referrer (a job page's URL names
    the job), and revalidation on every load so an upgraded server's page is the one used."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = DASHBOARD_CSP
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response


def docs_assets_dir() -> Path:
    """Swagger UI's bundle, CSS and favicon, as fastapi-offline ships them."""
    return Path(str(files("fastapi_offline") / "static"))


def mount_dashboard(app: FastAPI) -> None:
    """/ui/ (the dashboard), /ui/config.json (the choices its forms offer) and a redirect from
    / for browsers; API clients asking / still get the JSON index."""

    @app.get(f"{UI_PATH}/config.json", include_in_schema=False)
    async def dashboard_config() -> JSONResponse:
        # Taken from the schemas the API validates with, so the forms never offer what the
        # API would refuse.
        return JSONResponse({"architectures": list(ZOO_ARCHITECTURES), "methods": list(METHODS),
                             "builtin_datasets": list(BUILTIN_DATASETS),
                             "model_formats": list(MODEL_FORMATS)})

    @app.get(UI_PATH, include_in_schema=False)
    async def dashboard_slash(request: Request) -> RedirectResponse:
        # Relative links in index.html resolve against /ui/, not /.
        return RedirectResponse(f"{request.scope.get('root_path', '')}{UI_PATH}/", status_code=308)

    app.mount(UI_PATH, DashboardFiles(directory=STATIC_DIR, html=True), name="dashboard")


def wants_html(request: Request) -> bool:
    """A browser's navigation (Accept: text/html ...), not an API client asking for JSON."""
    return "text/html" in request.headers.get("accept", "")


def mount_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) from local files. The app must be made with docs_url=None and
    redoc_url=None, or FastAPI's CDN pages would answer first."""
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
            # validatorUrl: Swagger UI's validator badge is an <img> from validator.swagger.io
            # (sent the spec's URL); FastAPI's BaseLayout shows none, and None keeps it off in
            # any layout. persistAuthorization off: a key typed in "Authorize" is never
            # written to localStorage.
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None,
                                   "persistAuthorization": False},
        )
