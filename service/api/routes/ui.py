"""``/ui``: a small dashboard, static files shipped in the package (no CDN, no build step).

The page itself needs no key; it calls the API with the key a person types into it, so
it shows that tenant's sessions only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import FileResponse, Response

from service.api.errors import problem_response

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static" / "ui"
_MEDIA = {"ui.js": "text/javascript", "ui.css": "text/css"}


@router.get("/ui")
async def dashboard() -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/ui/{name}")
async def dashboard_asset(name: str) -> Response:
    if name not in _MEDIA:
        return problem_response(404, "not-found", "Not found", f"no dashboard file {name}")
    return FileResponse(STATIC / name, media_type=_MEDIA[name])
