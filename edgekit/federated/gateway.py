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
- **Bounded bodies, spooled.** Each route has a body limit sized to what it legitimately carries
  (:data:`BODY_LIMITS`: an object push carries one array chunk of at most Flower's 5 MiB; release bytes
  only ever flow down, in responses). A declared length over the limit is refused before a byte is read,
  a streamed one when it crosses. The body is read whole before the request takes a forwarding slot, and
  the SuperLink's answer is read whole before the slot is given back (each held in memory up to
  :data:`SPOOL_BYTES`, in a temporary file past it, as nginx's request and response buffering do), so no
  client's speed holds a slot: the slots are the SuperLink's time only.
- **Bounded load.** At most :data:`MAX_CONCURRENT` requests are forwarded at once (others wait up to
  :data:`QUEUE_SECONDS`, then get 503, which Flower's client retries); at most :data:`MAX_CONNECTIONS`
  connections are open. A client that sends nothing for :data:`IDLE_SECONDS` mid-body, or takes over
  :data:`BODY_SECONDS` for one body, gets 408.
- **Bounded time on every connection**, which uvicorn itself does not bound (its issue #157): a request
  head (request line and headers) must be complete within :data:`HEADER_SECONDS` of the connection (or, on
  a kept-alive one, of the head's first byte), and a client that reads none of its answer for
  :data:`IDLE_SECONDS` is dropped. When all :data:`MAX_CONNECTIONS` are open, a new connection sheds the one
  that has waited longest on its own client (no head yet, idle between requests, or a body still arriving),
  so connections that send nothing, or a byte now and then (slowloris), cannot lock devices out.
- **Bounded TLS handshakes.** The gateway does the TLS handshake in its own protocol (``loop.start_tls``), not in
  the listening socket, where asyncio gives a connection 60 s before the server sees it at all: each handshake must
  end within :data:`HEADER_SECONDS`, and at most :data:`MAX_HANDSHAKES` (:data:`MAX_HANDSHAKES_PER_CLIENT` per
  address) are pending, a new one shedding the oldest. Before, 1,100 TCP connections that never sent a ClientHello
  held every file descriptor of a gateway limited to 1,024 and refused every device; the gateway also raises its
  own descriptor limit to the hard limit at start. A connection closed while its client still sends (a body
  refused with 413) lingers first (:data:`LINGER_SECONDS`), so the client reads its answer.

Why hand-written and not nginx or Envoy: neither installs with the SDK from the package registry (a
Python distribution would need a system package and a generated configuration per fleet), and both
match locations on a *normalised* path by default (nginx decodes ``%2e`` and resolves ``..`` before
matching), the opposite of the exact raw-path rule; the route table would also have to be restated
per Flower version instead of read from Flower. The gateway is ~300 lines on uvicorn and httpx, which
the SuperLink itself already runs on.

    python -m edgekit.federated.gateway --host 0.0.0.0 --port 9093 --upstream-port 9092 \\
        --certfile server.pem --keyfile server.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, Any

MIB = 1 << 20
SMALL_BODY = 256 << 10
"""The body limit of a Fleet route that carries ids, a public key or a heartbeat."""
BODY_LIMITS = {"/v1/fleet/push-object": 5 * MIB + MIB, "/v1/fleet/push-messages": 4 * MIB}
"""Routes whose requests carry more than :data:`SMALL_BODY`: one object (an array chunk of at most Flower's
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``, 5 MiB, plus framing), or message headers with their object trees."""
ANSWER_LIMIT = 32 * MIB
"""The largest answer forwarded from the SuperLink (a Fleet answer carries at most one 5 MiB object chunk)."""
SPOOL_BYTES = SMALL_BODY
"""A body or answer larger than this waits in a temporary file rather than in memory."""
MAX_CONCURRENT = 32
MAX_CONNECTIONS = 256
QUEUE_SECONDS = 10.0
HEADER_SECONDS = 10.0
IDLE_SECONDS = 30.0
BODY_SECONDS = 300.0
CHUNK = 1 << 16
LOG_SECONDS = 60.0
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * MIB
"""Closing a TLS connection whose client is still sending (a body refused with 413), the gateway reads and drops
what arrives until the client pauses, for at most these seconds and bytes (nginx's lingering close): closed at once,
the unread bytes made the kernel reset the connection, and the client lost the answer it was refused with."""
LINGER_QUIET = 0.5
MAX_HANDSHAKES = 128
"""Connections still in their TLS handshake, at most; a new one past it sheds the one that has waited longest."""
MAX_HANDSHAKES_PER_CLIENT = 16
"""Connections from one address still in their TLS handshake, at most; a new one past it sheds that address's
oldest."""
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


async def _read_body(receive: Receive, limit: int, into: IO[bytes]) -> int:
    """Read the request body into ``into`` as it arrives; its length, or :class:`_Refused` past ``limit`` bytes
    or a slow client's time."""
    deadline = time.monotonic() + BODY_SECONDS
    counted = 0
    while True:
        wait = min(IDLE_SECONDS, deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
        except asyncio.TimeoutError:
            raise _Refused(408, "the request body arrived too slowly") from None
        if message["type"] == "http.disconnect":
            raise _Refused(400, "the client disconnected mid-body")
        chunk = message.get("body", b"")
        counted += len(chunk)
        if counted > limit:
            raise _Refused(413, f"request body over this route's limit of {limit:,} bytes")
        into.write(chunk)
        if not message.get("more_body", False):
            return counted


async def _chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
    spool.seek(0)
    while chunk := spool.read(CHUNK):
        yield chunk


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
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as body, tempfile.SpooledTemporaryFile(SPOOL_BYTES) as answer:
            length = await _read_body(receive, limit, body)
            try:
                await asyncio.wait_for(slots.acquire(), timeout=QUEUE_SECONDS)
            except asyncio.TimeoutError:
                raise _Refused(503, "the gateway is busy; retry") from None
            try:
                status, headers = await _exchange(client, route, scope, (body, length), answer)
            finally:
                slots.release()
            await _answer(send, status, headers, answer)

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


async def _exchange(client: Any, route: bytes, scope: Scope, body: tuple[IO[bytes], int],
                    answer: IO[bytes]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Send one spooled request body to the route on the SuperLink; its status and headers, the answer's bytes
    written to ``answer``."""
    import httpx

    spool, length = body
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
    headers.append((b"content-length", str(length).encode()))
    request = client.build_request("POST", route.decode("ascii"), headers=headers, content=_chunks(spool))
    try:
        response = await client.send(request, stream=True)
        try:
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > ANSWER_LIMIT:
                    raise _Refused(502, f"the SuperLink's answer is over {ANSWER_LIMIT:,} bytes")
                answer.write(chunk)
        finally:
            await response.aclose()
    except httpx.HTTPError:
        raise _Refused(502, "the SuperLink is not reachable") from None
    out = [(k, v) for k, v in response.headers.raw
           if k.decode("latin-1").lower() not in _DROP_FROM_RESPONSE | {"content-length"}]
    return response.status_code, [*out, (b"content-length", str(size).encode())]


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], answer: IO[bytes]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    async for chunk in _chunks(answer):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class _DropLog:
    """One log line per reason a connection is dropped, at most every :data:`LOG_SECONDS`, with the count since:
    a flood of connections cannot flood the log."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def note(self, why: str, client: str) -> None:
        self.count[why] = self.count.get(why, 0) + 1
        now = time.monotonic()
        if now - self.last.get(why, -LOG_SECONDS) >= LOG_SECONDS:
            logging.getLogger("edgekit.gateway").warning(
                "gateway: dropped %d connection(s), the last from %s: it %s", self.count[why], client, why)
            self.last[why], self.count[why] = now, 0


_DROPS = _DropLog()


class _Lingering:
    """A TLS transport whose ``close`` lingers (:data:`LINGER_SECONDS`): what uvicorn's protocol is given."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport, self._protocol, self._closing = transport, protocol, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._protocol._linger(self._transport)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()


class _Handshakes:
    """The connections still in their TLS handshake, each with when it arrived and from which address."""

    def __init__(self) -> None:
        self.pending: dict[Any, tuple[float, str]] = {}

    def admit(self, protocol: Any, host: str) -> None:
        """Register ``protocol``'s handshake; past :data:`MAX_HANDSHAKES_PER_CLIENT` from ``host`` or
        :data:`MAX_HANDSHAKES` in all, first drop the oldest pending one (of that address, then of all)."""
        for limit, of_host in ((MAX_HANDSHAKES_PER_CLIENT, True), (MAX_HANDSHAKES, False)):
            waiting = [p for p, (_, h) in self.pending.items() if h == host or not of_host]
            if len(waiting) >= limit:
                oldest = min(waiting, key=lambda p: self.pending[p][0])
                self.pending.pop(oldest)
                oldest._drop("was shed in its TLS handshake for a new connection")
        self.pending[protocol] = (time.monotonic(), host)

    def done(self, protocol: Any) -> None:
        self.pending.pop(protocol, None)


_HANDSHAKES = _Handshakes()


def _shed_oldest(connections: set[Any], new: Any) -> None:
    """Past :data:`MAX_CONNECTIONS`, close the connections (other than ``new``) that have waited longest on their
    clients: no request head yet, idle between requests, or a body still arriving."""
    while len(connections) >= MAX_CONNECTIONS:
        waiting = [c for c in connections if c is not new and c._waiting_on_client()]
        if not waiting:
            return
        oldest = min(waiting, key=lambda c: c._since)
        oldest._drop("was shed for a new connection: the gateway is full")
        connections.discard(oldest)


def _protocol(tls: ssl.SSLContext | None) -> type:
    """uvicorn's h11 protocol with the limits uvicorn lacks: the TLS handshake (with ``tls``) done here, bounded in
    time and number (:class:`_Handshakes`), a deadline on each request head, a client that reads nothing of its
    answer for :data:`IDLE_SECONDS` dropped, and a full gateway shedding the connection that has waited longest on
    its client."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GatewayProtocol(H11Protocol):  # type: ignore[misc]
        _head: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None
        _since = 0.0
        _raw: Any = None  # the TCP transport while the TLS handshake runs
        _ready = False  # uvicorn's protocol has its (TLS) transport
        _early = b""  # bytes the client sent with the handshake's end, before the protocol had its transport
        _lingering: Any = None  # the TLS transport while it lingers before closing
        _lingered = 0
        _quiet: asyncio.TimerHandle | None = None
        _linger_end: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            if tls is None:
                self._start(transport)
                return
            self._raw = transport
            transport.pause_reading()  # nothing reaches the HTTP parser before the handshake
            peer = transport.get_extra_info("peername")
            _HANDSHAKES.admit(self, str(peer[0]) if peer else "?")
            self._handshaking = self.loop.create_task(self._handshake(transport))  # a reference keeps the task

        async def _handshake(self, transport: Any) -> None:
            if transport.is_closing():  # shed or gone before its turn: start_tls would wait out its timeout
                _HANDSHAKES.done(self)
                return
            try:
                secure = await self.loop.start_tls(transport, self, tls, server_side=True,
                                                   ssl_handshake_timeout=HEADER_SECONDS)
            except Exception:  # noqa: BLE001 (a timeout, a reset, a bad ClientHello, a shed: one dropped connection)
                secure = None
            _HANDSHAKES.done(self)
            if secure is None:
                transport.abort()
                return
            self._start(_Lingering(secure, self))

        def _linger(self, transport: Any) -> None:
            """Close ``transport`` once the client pauses (:data:`LINGER_QUIET`), after :data:`LINGER_SECONDS`, or
            past :data:`LINGER_BYTES`, reading and dropping what it sends meanwhile."""
            self._lingering, self._lingered = transport, 0
            self._quiet = self.loop.call_later(LINGER_QUIET, transport.close)
            self._linger_end = self.loop.call_later(LINGER_SECONDS, transport.close)
            transport.resume_reading()  # flow control may have paused it

        def _start(self, transport: Any) -> None:
            super().connection_made(transport)
            self._ready = True
            self._since = time.monotonic()
            self._head = self.loop.call_later(HEADER_SECONDS, self._drop, "sent no complete request head in time")
            self._shed()
            if self._early:  # asyncio hands decrypted bytes over as the handshake ends, before start_tls returns
                early, self._early = self._early, b""
                self.data_received(early)

        def data_received(self, data: bytes) -> None:
            if self._lingering is not None:  # closing: dropped unread
                self._lingered += len(data)
                if self._quiet is not None:
                    self._quiet.cancel()
                self._quiet = self.loop.call_later(LINGER_QUIET, self._lingering.close)
                if self._lingered > LINGER_BYTES:
                    self._lingering.close()
                return
            if not self._ready:
                self._early += data
                if len(self._early) > CHUNK:
                    self._drop("sent more than a request head with its TLS handshake")
                return
            if self._head is None and self.conn.their_state is h11.IDLE:  # a kept-alive connection's next head
                self._head = self.loop.call_later(HEADER_SECONDS, self._drop, "sent no complete request head in time")
            super().data_received(data)
            if self._head is not None and self.conn.their_state is not h11.IDLE:
                self._head.cancel()
                self._head = None

        def on_response_complete(self) -> None:
            self._since = time.monotonic()
            super().on_response_complete()

        def pause_writing(self) -> None:
            if not self._ready:
                return
            super().pause_writing()
            if self._stall is None:
                self._stall = self.loop.call_later(IDLE_SECONDS, self._drop, "read none of its answer in time")

        def resume_writing(self) -> None:
            if not self._ready:
                return
            super().resume_writing()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._head, self._stall, self._quiet, self._linger_end):
                if timer is not None:
                    timer.cancel()
            _HANDSHAKES.done(self)
            if self._ready:
                super().connection_lost(exc)

        def _waiting_on_client(self) -> bool:
            return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

        def _shed(self) -> None:
            _shed_oldest(self.connections, self)

        def _drop(self, why: str) -> None:
            transport = self.transport if self._ready else self._raw
            peer = self.client or (transport.get_extra_info("peername") if transport is not None else None)
            _DROPS.note(why, f"{peer[0]}:{peer[1]}" if peer else "a client")
            if transport is not None:
                transport.abort()

    return GatewayProtocol


def _raise_descriptor_limit() -> None:
    """The soft limit on open files raised to the hard one (a shell's default soft limit is often 1,024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


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
    tls = None
    if args.certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2 or newer, no client certificate
        tls.load_cert_chain(args.certfile, args.keyfile)
    _raise_descriptor_limit()
    # h11 (the protocol is uvicorn's h11 one): its raw_path is the request target byte for byte (httptools' is the
    # parsed URL's path, which hides an absolute-form target)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    # TLS in the protocol (bounded handshakes), on asyncio's loop: it honours a read paused in connection_made, so
    # the ClientHello waits for start_tls (uvloop starts reading after connection_made returns, and the ClientHello
    # reached the HTTP protocol instead)
    uvicorn.run(app, host=args.host, port=args.port, loop="asyncio",
                log_level="warning", access_log=False, lifespan="on", http=_protocol(tls), ws="none",
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=int(IDLE_SECONDS),
                h11_max_incomplete_event_size=16384)


if __name__ == "__main__":
    main()
