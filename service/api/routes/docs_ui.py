"""``/docs``: Swagger UI from files installed with optserve, so it renders offline.

FastAPI's default page loads Swagger UI's JavaScript and CSS (and a favicon) from a CDN:
on a machine without internet it is blank. The ``fastapi-swagger`` wheel ships Swagger
UI's built files (MIT, as Swagger UI is Apache-2.0); they are served here from where pip
put them, and the page asks no other host for anything (no validator badge either).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse, Response

from service.api.errors import problem_response

router = APIRouter(include_in_schema=False)

ASSETS = "/docs/assets"
_MEDIA = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


@cache
def _resources() -> Path | None:
    # found without importing the package: its __init__ imports a FastAPI patcher we do not use
    spec = importlib.util.find_spec("fastapi_swagger")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "resources"


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="optserve - API",
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        # the validator badge would send the document to validator.swagger.io
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(ASSETS + "/{name}")
async def swagger_asset(name: str) -> Response:
    root = _resources()
    if name not in _MEDIA or root is None or not (root / name).is_file():
        return problem_response(404, "not-found", "Not found", f"no documentation asset {name}")
    return FileResponse(
        root / name, media_type=_MEDIA[name], headers={"Cache-Control": "max-age=86400"}
    )
