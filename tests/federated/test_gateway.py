"""The Fleet-only gateway on real processes (a TLS SuperLink with node auth, the gateway in front): an outsider
with only ca.crt tries every traversal form, and floods it with large bodies while its memory is measured."""

import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest

GATEWAY = pytest.mark.xdist_group("gateway")


def _raw(port: int, ca: Path, target: bytes, *, method: bytes = b"POST", body: bytes = b"",
         headers: bytes = b"") -> tuple[int, bytes]:
    """Send one request with the target exactly as given (no client library normalises it); (status, body)."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain, \
            context.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
                     + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head.split(b" ")[1]), rest


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """A SuperLink (TLS, node auth) on loopback and the gateway in front of it."""
    from edgekit.federated.processes import FLOWER_ENV, Processes, free_port, start_gateway, start_superlink
    from edgekit.federated.tls import make_certificates

    base = tmp_path_factory.mktemp("gateway")
    certs = make_certificates(base / "certs")
    bin_dir = Path(sys.executable).parent
    procs = Processes(base, {**os.environ, **FLOWER_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    port, gateway = free_port(), free_port()
    try:
        start_superlink(procs, bin_dir, base, port, certs, node_auth=True)
        start_gateway(procs, gateway, port, certs)
        yield {"port": port, "gateway": gateway, "ca": certs["ca"], "procs": procs}
    finally:
        procs.stop()


TRAVERSALS = [
    b"/v1/fleet/../control/list-runs", b"/v1/fleet/%2e%2e/control/list-runs", b"/v1/fleet/..%2fcontrol/list-runs",
    b"/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs", b"/v1/fleet/../../v1/control/list-runs",
    b"/v1/fleet/./../control/list-runs", b"/v1/fleet//../control/list-runs", b"//v1/control/list-runs",
    b"/v1/fleet/pull-messages/../../control/list-runs", b"/v1/fleet/;/../../control/list-runs",
    b"/v1/fleet/..;/control/list-runs", b"/v1/fleet/..\\control\\list-runs", b"/v1/fleet/%2e%2e%5ccontrol%5clist-runs",
    b"/v1/fleet/%252e%252e/control/list-runs", b"/V1/FLEET/../CONTROL/LIST-RUNS", b"/v1/fleet/get-run/",
    b"/v1/fleet/get-run%00", b"/v1/fleet/get-run?x=/../../control/list-runs", b"/v1/control/list-runs",
    b"/v1/control/register-node", b"/v1/control/start-run", b"/v1/runtime/pull-task-input", b"/docs", b"*",
    b"/v1/fleet/", b"/v1/fleet",
]


@GATEWAY
def test_no_traversal_form_reaches_the_control_api_and_the_fleet_routes_do(link):
    port, ca = link["gateway"], link["ca"]
    targets = [*TRAVERSALS, b"http://127.0.0.1:%d/v1/fleet/../control/list-runs" % port,
               b"http://127.0.0.1:%d/v1/control/list-runs" % port, b"https://evil/v1/fleet/get-run",
               b"127.0.0.1:%d" % port]
    answers = {target: _raw(port, ca, target) for target in targets}
    through = {t: s for t, (s, _) in answers.items() if s < 400 or s >= 500}
    assert not through, through
    assert {s for s, _ in answers.values()} <= {400, 404, 405}, answers
    assert all(b"served here" in body or b"POST" in body for _, body in answers.values())
    # the same control route straight on the SuperLink's loopback port answers (the gateway is what refuses)
    assert _raw(link["port"], ca, b"/v1/control/list-runs")[0] == 200
    # another method on a Fleet route; a declared body over the route's limit is refused before it is read
    assert _raw(port, ca, b"/v1/fleet/get-run", method=b"GET")[0] == 405
    assert _raw(port, ca, b"/v1/fleet/get-run", headers=b"Content-Length: 300000000\r\n")[0] == 400  # two lengths
    # every Fleet route of Flower's own table is forwarded (Flower answers: not our JSON refusal)
    from edgekit.federated.gateway import fleet_routes

    routes = fleet_routes()
    assert b"/v1/fleet/pull-messages" in routes and b"/v1/fleet/push-object" in routes and len(routes) >= 10
    for route in routes:
        status, body = _raw(port, ca, route)
        assert b"served here" not in body and status != 404, (route, status, body[:200])


def _flood(port: int, ca: Path, target: bytes, total: int, *, declared: bool, results: list) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as plain, \
                context.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
            length = b"Content-Length: %d\r\n" % total if declared else b"Transfer-Encoding: chunked\r\n"
            sock.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + length + b"\r\n")
            chunk = os.urandom(1 << 16)
            framed = chunk if declared else b"%x\r\n" % len(chunk) + chunk + b"\r\n"
            sent = 0
            while sent < total:
                sock.sendall(framed)
                sent += len(chunk)
            results.append(("sent", sock.recv(64)[:12]))
    except OSError as exc:  # the gateway answered 413 and closed while we were still sending
        results.append(("closed", type(exc).__name__))


@GATEWAY
def test_a_flood_of_large_bodies_does_not_grow_the_gateway(link):
    port, ca = link["gateway"], link["ca"]
    gateway = next(proc for name, proc, _ in link["procs"].procs if name == "gateway")
    before = _rss_mib(gateway.pid)
    results, threads = [], []
    # three 300 MiB declared bodies, three streamed ones of unknown length, and 40 at the push-object limit at
    # once (forwarded: Flower refuses them as bad protobuf)
    for declared in (True, False):
        for _ in range(3):
            threads.append(threading.Thread(target=_flood, args=(port, ca, b"/v1/fleet/push-object", 300 << 20),
                                            kwargs={"declared": declared, "results": results}))
    for _ in range(40):
        threads.append(threading.Thread(target=_flood, args=(port, ca, b"/v1/fleet/push-object", 6 << 20),
                                        kwargs={"declared": True, "results": results}))
    peak = [before]

    def watch() -> None:
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], _rss_mib(gateway.pid))
            time.sleep(0.05)

    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.join(timeout=300)
    watcher.join()
    assert len(results) == len(threads)
    assert peak[0] - before < 256, (before, peak[0])
    # the 300 MiB bodies were refused long before they were sent whole
    status, body = _raw(port, ca, b"/v1/fleet/push-object", body=b"x" * ((6 << 20) + 1))
    assert status == 413 and b"limit" in body
    assert _raw(port, ca, b"/v1/fleet/get-run", body=b"x" * (300 << 10))[0] == 413
    link["procs"].check()  # the gateway and the SuperLink are still up


@GATEWAY
def test_join_with_a_key_the_fleet_did_not_register_says_flowers_reason(link, tmp_path):
    import subprocess

    from conftest import BIN

    from edgekit.fleet.signing import new_keys

    _, public = new_keys(tmp_path / "release-keys")
    made = subprocess.run([str(BIN / "edgekit-agent"), "node-key", "--out", str(tmp_path / "keys")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([str(BIN / "edgekit-agent"), "join", "--superlink", f"127.0.0.1:{link['gateway']}",
                           "--ca", str(link["ca"]), "--key", str(tmp_path / "keys" / "node.key"), "--store",
                           str(tmp_path / "store"), "--trust", str(public)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert "the SuperNode exited with code" in last and "Failed to activate SuperNode" in last, last
    assert "Traceback" not in proc.stderr


# --- slow clients: the gateway's own time limits, on the real gateway process with its numbers shrunk ---------

TIGHT = {"HEADER_SECONDS": 6.0, "IDLE_SECONDS": 3.0, "MAX_CONNECTIONS": 16, "MAX_CONCURRENT": 4,
         "QUEUE_SECONDS": 3.0, "MAX_HANDSHAKES_PER_CLIENT": 8}
BIG = 24 << 20  # larger than loopback's socket buffers on both ends, so a client that reads nothing stalls the send


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """The gateway with the limits of TIGHT (the same code, smaller numbers, so a test waits seconds, not minutes),
    with TLS as devices meet it, in front of a stand-in upstream: a SuperLink gives large answers only to a
    registered node, so a plain HTTP server answers ``pull-object`` with BIG bytes and every other route ``ok``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edgekit.federated.processes import FLOWER_ENV, Processes, free_port, wait_port
    from edgekit.federated.tls import make_certificates

    class Upstream(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b"o" * BIG if self.path == "/v1/fleet/pull-object" else b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    base = tmp_path_factory.mktemp("tight")
    certs = make_certificates(base / "certs")
    procs = Processes(base, {**os.environ, **FLOWER_ENV})
    port = free_port()
    shrink = "; ".join(f"g.{name} = {value!r}" for name, value in TIGHT.items())
    procs.start("gateway", [sys.executable, "-c", f"import edgekit.federated.gateway as g; {shrink}; "
                            f"g.main(['--port', '{port}', '--upstream-port', '{upstream.server_address[1]}', "
                            f"'--certfile', '{certs['cert']}', '--keyfile', '{certs['key']}'])"])
    try:
        wait_port(port, procs)
        yield {"port": port, "ca": certs["ca"], "log": base / "gateway.log", "procs": procs}
    finally:
        procs.stop()
        upstream.shutdown()


def _tls(gateway: dict) -> ssl.SSLSocket:
    """A TLS connection to the gateway, handshake done."""
    context = ssl.create_default_context(cafile=str(gateway["ca"]))
    plain = socket.create_connection(("127.0.0.1", gateway["port"]), timeout=30)
    return context.wrap_socket(plain, server_hostname="127.0.0.1")


def _ask(gateway: dict, target: bytes = b"/v1/fleet/get-run") -> tuple[int, bytes, float]:
    """One whole request on a new connection: (status, body, seconds)."""
    start = time.monotonic()
    with _tls(gateway) as sock:
        sock.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            if rest and len(rest) >= int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                             if line.lower().startswith(b"content-length:"))):
                break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest, time.monotonic() - start


def _closed(sockets: list[ssl.SSLSocket], wait: float) -> int:
    """How many of ``sockets`` the gateway closed within ``wait`` seconds (end of stream or a reset). A TLS 1.3
    socket turns readable for the server's session tickets too: that read wants more and the socket is open."""
    import select

    closed, deadline = set(), time.monotonic() + wait
    while time.monotonic() < deadline and len(closed) < len(sockets):
        readable, _, _ = select.select([s for s in sockets if s not in closed], [], [], 0.1)
        for sock in readable:
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                if not sock.recv(65536):
                    closed.add(sock)
            except (ssl.SSLWantReadError, BlockingIOError):
                pass
            except OSError:
                closed.add(sock)
            finally:
                sock.settimeout(timeout)
    return len(closed)


@GATEWAY
def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(tight):
    head = b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with _tls(tight) as sock:
        start, cut = time.monotonic(), None
        for byte in head:  # a byte every 0.2 s: 40 s for the head, were it let through
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = time.monotonic() - start
                break
            if _closed([sock], 0.2):
                cut = time.monotonic() - start
                break
    assert cut is not None and TIGHT["HEADER_SECONDS"] - 0.5 < cut < TIGHT["HEADER_SECONDS"] + 3, cut
    assert _ask(tight)[:2] == (200, b"ok")
    assert "sent no complete request head in time" in tight["log"].read_text()


@GATEWAY
def test_connections_that_send_nothing_do_not_lock_devices_out(tight):
    """Three times the connection limit held open silently; a device's request still goes through at once (before
    the gateway shed them, uvicorn answered every request past the limit 503 for as long as they stayed)."""
    silent = [_tls(tight)
              for _ in range(3 * TIGHT["MAX_CONNECTIONS"])]
    try:
        status, body, seconds = _ask(tight)
        assert (status, body) == (200, b"ok") and seconds < 10, (status, body, seconds)
        # shed oldest first: at most the limit stay open, well before the head deadline would have closed them
        assert _closed(silent, 0.5) >= len(silent) - TIGHT["MAX_CONNECTIONS"] + 1
        assert _closed(silent[-4:], 0.1) == 0  # the newest are still open
    finally:
        for sock in silent:
            sock.close()
    assert "was shed for a new connection" in tight["log"].read_text()


@GATEWAY
def test_connections_that_never_start_tls_do_not_lock_devices_out(tight):
    """TCP connections that never send a ClientHello: asyncio held each for 60 s before the gateway saw it, outside
    every limit, and 1,100 of them took every descriptor of a gateway limited to 1,024, so every device was refused.
    The gateway does the handshake itself now: a new connection sheds the oldest pending one of its address past
    MAX_HANDSHAKES_PER_CLIENT, and each handshake ends at the head deadline."""
    silent = [socket.create_connection(("127.0.0.1", tight["port"]), timeout=30)
              for _ in range(10 * TIGHT["MAX_HANDSHAKES_PER_CLIENT"])]
    try:
        status, body, seconds = _ask(tight)
        assert (status, body) == (200, b"ok") and seconds < 10, (status, body, seconds)
        assert _closed(silent, 1.0) >= len(silent) - TIGHT["MAX_HANDSHAKES_PER_CLIENT"]
        assert _closed(silent[-4:], 0.1) == 0  # the newest still wait, until the deadline
        assert _closed(silent, TIGHT["HEADER_SECONDS"] + 3) == len(silent)
    finally:
        for sock in silent:
            sock.close()
    assert "was shed in its TLS handshake for a new connection" in tight["log"].read_text()


@GATEWAY
def test_bodies_sent_slowly_hold_no_forwarding_slot(tight):
    """Three times the forwarding slots taken by bodies that stall after 10 of 1000 bytes: a device's request is
    answered at once (before, each stalled body held a slot and the device waited out the queue for a 503)."""
    slow = []
    for _ in range(3 * TIGHT["MAX_CONCURRENT"]):
        sock = _tls(tight)
        sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        slow.append(sock)
    try:
        status, body, seconds = _ask(tight)
        assert (status, body) == (200, b"ok") and seconds < 10, (status, body, seconds)
        # and each stalled body gets its 408 once it has sent nothing for IDLE_SECONDS
        answers = [sock.recv(64) for sock in slow]
        assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
    finally:
        for sock in slow:
            sock.close()


@GATEWAY
def test_clients_that_read_none_of_a_large_answer_hold_no_slot_and_are_dropped(tight):
    readers = []
    for _ in range(3 * TIGHT["MAX_CONCURRENT"] // 2):
        sock = _tls(tight)
        sock.sendall(b"POST /v1/fleet/pull-object HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        readers.append(sock)
    try:
        time.sleep(1.0)  # every answer fetched from upstream, none read
        status, body, seconds = _ask(tight)
        assert (status, body) == (200, b"ok") and seconds < 10, (status, body, seconds)
        time.sleep(TIGHT["IDLE_SECONDS"] + 1.5)
        received = []
        for sock in readers:
            got = 0
            try:
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            except OSError:
                pass
            received.append(got)
        assert all(got < BIG for got in received), received  # cut off mid-answer, not sent it whole
    finally:
        for sock in readers:
            sock.close()
    assert "read none of its answer in time" in tight["log"].read_text()
