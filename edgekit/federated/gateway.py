"""A Fleet-only TLS gateway: what devices reach of a federation, and nothing else.

Flower 1.41 serves its Fleet API (SuperNodes), Control API (``flwr run``, ``flwr supernode
register``) and Runtime API on one HTTP port, and the open-source SuperLink authenticates nothing on
the Control API (its OIDC account plugin is not in this distribution), nor can a SuperNode verify app
signatures (``--trusted-entities`` needs a licensed SuperLink). Anyone who could reach that port with
the public ``ca.crt`` could register a node and run code on the server and on every device.

So the SuperLink binds to 127.0.0.1 only, and this gateway is the one address devices are given. It
terminates TLS with the SuperLink's certificate and lets through exactly the Fleet API of the Flower
version installed, nothing else:

- **Exact routes.** The request target as the client sent it (uvicorn's ``raw_path`` under its h11
  parser, which keeps the target byte for byte) must equal one of the Fleet routes in Flower's own
  route table (:func:`fleet_routes`), method POST, with no query. A target that is not origin-form
  (``http://host/...``), or holds a dot segment, a percent escape, ``//``, ``;`` or ``\\``, is refused
  with 400; any other path with 404. What is forwarded is the route from the table, never the client's
  string, so no later normalisation (httpx resolves dot segments) can turn one path into another.
- **Bounded bodies, streamed.** Each route has a body limit sized to what it legitimately carries
  (:data:`BODY_LIMITS`: an object push carries one array chunk of at most Flower's 5 MiB; release bytes
  only ever flow down, in responses). Bodies stream through in both directions, never buffered whole;
  a declared length over the limit is refused before a byte is read, a streamed one when it crosses.
- **Bounded load.** At most :data:`MAX_CONCURRENT` requests are forwarded at once (others wait up to
  :data:`QUEUE_SECONDS`, then get 503, which Flower's client retries); uvicorn refuses connections past
  :data:`MAX_CONNECTIONS`. A client that sends nothing for :data:`IDLE_SECONDS` mid-body, or takes over
  :data:`BODY_SECONDS` for one body, gets 408.

Why hand-written and not nginx or Envoy: neither installs with the SDK from the package registry (a
Python distribution would need a system package and a generated configuration per fleet), and both
match locations on a *normalised* path by default (nginx decodes ``%2e`` and resolves ``..`` before
matching), the opposite of the exact raw-path rule; the route table would also have to be restated
per Flower version instead of read from Flower. The gateway is ~200 lines on uvicorn and httpx, which
the SuperLink itself already runs on.

    python -m edgekit.federated.gateway --host 0.0.0.0 --port 9093 --upstream-port 9092 \\
        --certfile server.pem --keyfile server.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

MIB = 1 << 20
SMALL_BODY = 256 << 10
"""The body limit of a Fleet route that carries ids, a public key or a heartbeat."""
BODY_LIMITS = {"/v1/fleet/push-object": 5 * MIB + MIB, "/v1/fleet/push-messages": 4 * MIB}
"""Routes whose requests carry more than :data:`SMALL_BODY`: one object (an array chunk of at most Flower's
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB, plus framing), or message headers with their object trees."""
MAX_CONCURRENT = 32
MAX_CONNECTIONS = 256
QUEUE_SECONDS = 10.0
IDLE_SECONDS = 30.0
BODY_SECONDS = 300.0
_SUSPICIOUS = (b"/.", b"%", b"//", b";", b"\\")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
               b"transfer-encoding", b"upgrade", b"host", b"content-length", b"forwarded", b"x-forwarded-for",
               b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"}
_DROP_FROM_RESPONSE = {"connection", "keep-alive", "transfer-encoding"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def fleet_routes() -> dict[bytes, int]:
    """Every POST route of Flower's Fleet API router (the installed Flower's own table) -> its body limit."""
    from flwr.superlink.routers.fleet.router import router

    routes = {}
    for route in router.routes:
        path = getattr(route, "path", "")
        if "POST" in (getattr(route, "methods", None) or ()) and path.startswith("/v1/fleet/"):
            routes[path.encode("ascii")] = BODY_LIMITS.get(path, SMALL_BODY)
    if not routes:
        raise RuntimeError("Flower's Fleet router lists no routes; this Flower version is not supported")
    return routes


def check_target(scope: Scope, routes: dict[bytes, int]) -> bytes:
    """The Fleet route a request names exactly, or :class:`_Refused` (400 for a malformed target, 404 for
    another path, 405 for another method)."""
    raw = scope.get("raw_path") or b""
    if not raw.startswith(b"/") or raw.startswith(b"//"):
        raise _Refused(400, "only origin-form request targets (/v1/fleet/...) are served here")
    if any(part in raw for part in _SUSPICIOUS) or raw.lower() != raw or scope.get("query_string"):
        raise _Refused(400, "the request target holds a dot segment, an escape, '//', ';', '\\', upper case or "
                            "a query; only the Fleet API's exact routes are served here")
    if raw not in routes:
        raise _Refused(404, "only the Fleet API is served here")
    if scope["method"] != "POST":
        raise _Refused(405, "the Fleet API takes POST only")
    return raw


def _declared_length(scope: Scope, limit: int) -> int | None:
    values = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit():
        raise _Refused(400, "the request has a malformed or repeated Content-Length")
    length = int(values[0])
    if length > limit:
        raise _Refused(413, f"request body of {length:,} bytes is over this route's limit of {limit:,}")
    return length


async def _body(receive: Receive, limit: int, counted: list[int]) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused past ``limit`` bytes or a slow client's time."""
    deadline = time.monotonic() + BODY_SECONDS
    while True:
        wait = min(IDLE_SECONDS, deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
        except asyncio.TimeoutError:
            raise _Refused(408, "the request body arrived too slowly") from None
        if message["type"] == "http.disconnect":
            raise _Refused(400, "the client disconnected mid-body")
        chunk = message.get("body", b"")
        counted[0] += len(chunk)
        if counted[0] > limit:
            raise _Refused(413, f"request body over this route's limit of {limit:,} bytes")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send, client: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_app(upstream: str, *, ca: str | None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app forwarding the Fleet API to ``upstream`` (``https://127.0.0.1:PORT``), verified with ``ca``.

    >>> app = make_app("https://127.0.0.1:9092", ca="certs/ca.crt")   # doctest: +SKIP
    """
    import httpx

    routes = fleet_routes()
    client = httpx.AsyncClient(base_url=upstream, verify=ca if ca else False,
                               timeout=httpx.Timeout(600.0, connect=10.0),
                               limits=httpx.Limits(max_connections=MAX_CONCURRENT))
    slots = asyncio.Semaphore(MAX_CONCURRENT)

    async def forward(scope: Scope, receive: Receive, send: Send) -> None:
        route = check_target(scope, routes)
        limit = routes[route]
        _declared_length(scope, limit)
        try:
            await asyncio.wait_for(slots.acquire(), timeout=QUEUE_SECONDS)
        except asyncio.TimeoutError:
            raise _Refused(503, "the gateway is busy; retry") from None
        try:
            await _proxy(client, route, scope, receive, send, limit)
        finally:
            slots.release()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, client)
            return
        if scope["type"] != "http":
            return
        try:
            await forward(scope, receive, send)
        except _Refused as refused:
            await _respond(send, refused.status, refused.detail)

    return app


async def _proxy(client: Any, route: bytes, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    """Stream one request to the route on the SuperLink and its response back."""
    import httpx

    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
    counted = [0]
    request = client.build_request("POST", route.decode("ascii"), headers=headers,
                                   content=_body(receive, limit, counted))
    try:
        response = await client.send(request, stream=True)
    except _Refused:
        raise
    except httpx.HTTPError:
        raise _Refused(502, "the SuperLink is not reachable") from None
    try:
        out = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in _DROP_FROM_RESPONSE]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgekit.federated.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address devices connect to (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True, help="the SuperLink's port on 127.0.0.1")
    parser.add_argument("--certfile", help="TLS certificate devices see (omit both for an insecure gateway)")
    parser.add_argument("--keyfile")
    parser.add_argument("--ca", help="CA that signed the SuperLink's certificate")
    args = parser.parse_args(argv)
    import uvicorn

    scheme = "https" if args.ca else "http"
    app = make_app(f"{scheme}://127.0.0.1:{args.upstream_port}", ca=args.ca)
    # h11: its raw_path is the request target byte for byte (httptools' is the parsed URL's path, which hides
    # an absolute-form target)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False, lifespan="on", http="h11", ws="none",
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=int(IDLE_SECONDS),
                h11_max_incomplete_event_size=16384)


if __name__ == "__main__":
    main()
