"""A Fleet-only TLS gateway: what devices reach of a federation, and nothing else.

Flower 1.41 serves its Fleet API (SuperNodes), Control API (``flwr run``, ``flwr supernode
register``) and Runtime API on one HTTP port, and the open-source SuperLink authenticates nothing on
the Control API (its OIDC account plugin is not in this distribution), nor can a SuperNode verify app
signatures (``--trusted-entities`` needs a licensed SuperLink). Anyone who could reach that port with
the public ``ca.crt`` could register a node and run code on the server and on every device.

So the SuperLink binds to 127.0.0.1 only, and this gateway is the one address devices are given: it
terminates TLS with the SuperLink's certificate and forwards ``POST /v1/fleet/*`` (the only routes a
SuperNode calls) to the loopback SuperLink; every other path gets 404. Registering nodes and
submitting runs stay on the server's loopback, for the operator alone. Request bodies are bounded.

    python -m edgekit.federated.gateway --host 0.0.0.0 --port 9093 --upstream-port 9092 \\
        --certfile server.pem --keyfile server.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY_BYTES = 1024**3
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
               b"transfer-encoding", b"upgrade", b"host", b"content-length"}
_DROP_FROM_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _respond(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def make_app(upstream: str, *, ca: str | None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app forwarding the Fleet API to ``upstream`` (``https://127.0.0.1:PORT``), verified with ``ca``."""
    import httpx

    client = httpx.AsyncClient(base_url=upstream, verify=ca if ca else False, timeout=httpx.Timeout(600.0))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or not scope["path"].startswith(FLEET_PREFIX):
            await _respond(send, 404, "only the Fleet API is served here")
            return
        body = await _body(receive, MAX_BODY_BYTES)
        if body is None:
            await _respond(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        query = scope.get("query_string", b"").decode()
        try:
            response = await client.post(scope["path"] + (f"?{query}" if query else ""), content=body,
                                         headers=headers)
        except httpx.HTTPError:
            await _respond(send, 502, "the SuperLink is not reachable")
            return
        content = response.content
        out = [(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() not in _DROP_FROM_RESPONSE]
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [*out, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return app


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
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
