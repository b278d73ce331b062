"""A documented route that FastAPI does not resolve parameters for (for the hot path)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class RequestRoute(APIRoute):
    """An ``APIRoute`` whose endpoint takes the ``Request`` and answers a ``Response``.

    It is documented like any route (``responses``, ``openapi_extra``), but FastAPI
    resolves no parameters or dependencies for it: on the step route that resolution cost
    more than the optimizer step itself for small tensors. The endpoint reads what it
    needs from the request and calls the dependency functions itself.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            response: Response = await endpoint(request)
            return response

        return handler
