"""Reading request bodies: the media type first (415), then the bytes (413 while streaming).

A body is read chunk by chunk with a timeout on each wait: a client that stops sending
mid-body gets 408 and loses its connection after ``body_timeout_s``, instead of holding its
buffer forever.

A step's safetensors body goes into one buffer of its ``Content-Length`` as it arrives
(:func:`receive_body`), most of it read there by the server's protocol itself
(:mod:`service.api.in_place`, an extension beyond ASGI). Where this relies on more than
ASGI promises: that the server (uvicorn) never delivers a body longer or shorter than its
declared length without failing the request. A surplus would still be kept exactly, at
the cost of a join.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from starlette.requests import ClientDisconnect, Request

from service.api.in_place import EXTENSION as IN_PLACE
from service.api.in_place import InPlace, Into
from service.api.inflight import BODY_ACCOUNT, BodyAccount
from service.api.media import Wire, request_wire, require_json_answer
from service.api.problems import BodyTimeout, BodyTooLarge
from service.api.wire import parse_json_object
from service.buffers import PAGE, STEP_BUFFERS
from service.config import Settings

_CHUNK = 64 * 1024
"""uvicorn's chunk size: a body of under two is at most two chunks, cheap to join."""


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


Engage = Callable[[], Awaitable[InPlace | None]]
"""Asks for the rest of a body to be received in place, once a message has been taken."""


async def _receive(
    request: Request,
    limit: int | None,
    why: str,
    take: Callable[[bytes], None],
    observe: Callable[[bytes | memoryview], None] | None = None,
    engage: Engage | None = None,
) -> int:
    """Hand each chunk of the body to ``take``; the bytes received. ``limit`` is a step's
    own bound (``step_body_bytes``, explained by ``why``): past it, declared or received,
    the request is 413 at once. The server-wide ``max_body_bytes`` is counted by the
    RequestContext middleware as the chunks arrive.

    With ``engage`` the rest of the body may arrive in place (:func:`_chunks`): those
    bytes are already where ``take`` would put them, and only ``observe`` sees them."""
    if limit is not None:
        declared = _declared_length(request)
        if declared is not None and declared > limit:
            raise BodyTooLarge(limit, "step_body_bytes", why)
    settings: Settings = request.app.state.settings
    wait = settings.body_timeout_s
    loop = asyncio.get_running_loop()
    size = 0
    # The deadline moves only once it is less than ``wait`` away, to an eighth past it: a
    # stall is cut between ``wait`` and 9/8 of it after the last chunk, and a body that
    # arrives at once never moves its timer (each move costs a timer re-arm).
    slack = wait / 8
    deadline = asyncio.timeout_at(loop.time() + wait + slack)
    try:
        async with deadline:
            async for chunk, placed in _chunks(request, engage):
                now = loop.time()
                if (deadline.when() or now) - now < wait:
                    deadline.reschedule(now + wait + slack)
                if not chunk:
                    continue
                size += len(chunk)
                if limit is not None and size > limit:
                    raise BodyTooLarge(limit, "step_body_bytes", why)
                if not placed:
                    take(cast(bytes, chunk))  # a message's bytes
                if observe is not None:
                    observe(chunk)
    except TimeoutError:
        if deadline.expired():
            raise BodyTimeout(wait) from None
        raise
    return size


async def _chunks(
    request: Request, engage: Engage | None
) -> AsyncIterator[tuple[bytes | memoryview, bool]]:
    """The body's chunks as they arrive, each with whether it is already in place: from
    the request's messages until ``engage`` has the rest received in place, then views of
    the bytes as they land in the buffer."""
    body: InPlace | None = None
    while body is None:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        yield message.get("body", b""), False
        if not message.get("more_body", False):
            return
        if engage is not None:
            body = await engage()
    buffer, seen = body.view, body.start
    if buffer is None:  # detached: the response is complete, or the connection gone
        raise ClientDisconnect()
    while seen < body.end:
        got = await body.wait(seen)
        yield buffer[seen:got], True
        seen = got


async def read_body(
    request: Request,
    limit: int | None = None,
    why: str = "",
    observe: Callable[[bytes | memoryview], None] | None = None,
) -> bytes:
    """The whole body as one ``bytes`` (see :func:`_receive` for ``limit``); ``observe``
    is handed each chunk as it arrives (a fingerprint being computed, say)."""
    chunks: list[bytes] = []
    await _receive(request, limit, why, chunks.append, observe)
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


async def receive_body(
    request: Request,
    limit: int | None = None,
    why: str = "",
    aligned_at: Callable[[bytes], int | None] | None = None,
    observe: Callable[[bytes | memoryview], None] | None = None,
) -> bytes | memoryview:
    """The whole body, copied chunk by chunk into one buffer of its declared length.

    ASGI hands the body over as ``bytes`` chunks (uvicorn's are at most 64 KiB); joining
    them at the end is a second full-size copy and a second full-size allocation. With a
    ``Content-Length`` each chunk goes straight to its place in a buffer allocated once.
    This relies on uvicorn (h11 and httptools alike) failing a request whose body is
    longer or shorter than its ``Content-Length`` rather than delivering it; ASGI itself
    does not promise that, so a surplus is still kept, not lost. Without a length the
    chunks are joined as :func:`read_body` does.

    Once the first chunk is in the buffer, the buffer is offered to the server's protocol
    (:mod:`service.api.in_place`): where it takes it, the rest of the body is read from
    the socket straight into the buffer, and no further chunk is copied.

    ``observe`` is handed each chunk as it arrives (as :func:`read_body`'s is).
    ``aligned_at`` reads the body's first chunk and says which byte of the body to place
    on a page boundary (a safetensors body's tensor data): the disk store writes tensors
    so placed with ``O_DIRECT`` from this buffer, without copying them.

    The buffer comes from :data:`service.buffers.STEP_BUFFERS`: an earlier body's buffer of
    the same length nothing refers to any more, or a new ``np.empty`` whose pages become
    resident only as bytes arrive, so a declared length costs no memory before the body
    does (the middleware's body budget counts what arrives, or for a body in place its whole
    rest, before it is read). It is writable: decoders must hand out read-only views.
    """
    declared = _declared_length(request)
    if declared is None or (limit is not None and declared > limit) or declared < 2 * _CHUNK:
        return await read_body(request, limit, why, observe)
    view: memoryview | None = None
    extra: list[bytes] = []
    filled = 0

    def take(chunk: bytes) -> None:
        nonlocal view, filled
        if view is None:
            view = _placed(declared, None if aligned_at is None else aligned_at(chunk))
        room = declared - filled
        if len(chunk) <= room:
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        else:  # more than declared: uvicorn fails such a request first; stay exact anyway
            view[filled:declared] = chunk[:room]
            filled = declared
            extra.append(chunk[room:])

    into: Into | None = request.scope.get("extensions", {}).get(IN_PLACE)

    async def engage() -> InPlace | None:
        nonlocal into
        if view is None or extra or into is None:
            return None
        offer, into = into, None  # asked once: a body the protocol refuses stays messages
        # The messages will no longer carry the rest: it is counted (and waits for room in
        # the budget) before any of it is read into the buffer.
        account: BodyAccount | None = request.scope["state"].get(BODY_ACCOUNT)
        rest = declared - filled
        if account is not None:
            await account.add(rest)
        body = offer(view, filled)
        if body is None and account is not None:
            account.forget(rest)  # the messages go on: they are counted as they come
        return body

    size = await _receive(request, limit, why, take, observe, engage)
    if view is None:
        return b""
    if extra:
        return bytes(view[:filled]) + b"".join(extra)
    return view if size == declared else bytes(view[:size])


def _placed(length: int, aligned_at: int | None) -> memoryview:
    """A buffer of ``length`` bytes whose byte ``aligned_at`` is on a page boundary."""
    if aligned_at is None or not 0 <= aligned_at < length:
        return STEP_BUFFERS.take(length).data
    buffer = STEP_BUFFERS.take(length + PAGE)
    shift = -(buffer.ctypes.data + aligned_at) % PAGE
    return buffer[shift : shift + length].data


async def tensor_body(request: Request) -> tuple[Wire, bytes]:
    """A JSON or safetensors body, for a route that answers in JSON: its wire and bytes.

    Checks run in the order clients see them: the body's type (415), the answer's (406),
    then the size while reading (413).
    """
    wire = request_wire(request)
    require_json_answer(request)
    return wire, await read_body(request)


async def json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """A JSON object body; with ``optional``, an empty body (any or no type) reads as ``{}``."""
    if optional:
        body = await read_body(request)
        if not body:
            return {}
        request_wire(request, (Wire.JSON,))
    else:
        request_wire(request, (Wire.JSON,))
        body = await read_body(request)
    return parse_json_object(body)
