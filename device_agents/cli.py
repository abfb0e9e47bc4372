"""``edgekit-agent``: run, benchmark and install edgekit artifacts on a device. Never imports TensorFlow."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from device_agents.console import OneLineParser, quiet_native_logs, run
from device_agents.exit_codes import ExitCode
from device_agents.files import DEVICE_MAX_ARRAY_BYTES
from device_agents.serving.runtime import Runtime

_T0 = time.perf_counter()
RUNTIMES = tuple(r.value for r in Runtime)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edgekit-agent", description="Run edgekit artifacts with LiteRT or onnxruntime.",
                          exit_codes=True)
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)

    _add_serving(sub)
    _add_store(sub)
    _add_federated(sub)
    r = sub.add_parser("rollback", help="make the previous installed version current again")
    r.add_argument("--store", required=True)
    r.set_defaults(func=cmd_rollback)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="an artifact file, an edgekit output folder (hash-checked), or a store root")
    p.add_argument("--runtime", choices=RUNTIMES, help="force a runtime")
    p.add_argument("--threads", type=int, help="interpreter threads")


def _add_serving(sub: Any) -> None:
    """predict and bench."""
    p = sub.add_parser("predict", help="run samples from an .npz or .npy through the model")
    _model_args(p)
    p.add_argument("--input", required=True, help=".npz with an array x, or one .npy array")
    p.add_argument("--output", required=True, help=".npy to write (float32, one row per sample)")
    p.add_argument("--telemetry", help="write telemetry JSON here")
    p.add_argument("--batch", type=int, default=256, help="samples read and run at a time; memory stays at one "
                                                          "batch whatever the input's size (default %(default)s)")
    p.add_argument("--max-input-mib", type=int, metavar="MIB",
                   help="the largest input array accepted (default: EDGEKIT_MAX_ARRAY_BYTES, else "
                        f"{DEVICE_MAX_ARRAY_BYTES >> 20} MiB)")
    p.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="latency percentiles, cold start and peak memory")
    _model_args(b)
    b.add_argument("--input", help=".npz with x, or one .npy array (default: zeros of the input shape)")
    b.add_argument("--repeats", type=int, default=500)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)


def _add_store(sub: Any) -> None:
    """install and status (rollback stays last in the help)."""
    i = sub.add_parser("install", help="verify and atomically install a model version into a store")
    i.add_argument("--model", required=True, help="an edgekit output folder")
    i.add_argument("--store", required=True, help="the store root folder")
    i.add_argument("--runtime", choices=RUNTIMES)
    i.add_argument("--trust", metavar="PUBKEY",
                   help="install only releases signed with this key (signing.pub of `edgekit keys new`), each newer "
                        "than the last; the store pins the key at its first install and keeps requiring it")
    i.set_defaults(func=cmd_install)

    st = sub.add_parser("status", help="the versions a store serves, their release numbers, the pinned key")
    st.add_argument("--store", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


def _add_federated(sub: Any) -> None:
    """node-key and join."""
    k = sub.add_parser("node-key", help="write this device's SuperNode key pair: DIR/node.key (0600), DIR/node.pub")
    k.add_argument("--out", required=True, help="the folder for the key pair (an existing key is never replaced)")
    k.set_defaults(func=cmd_node_key)

    j = sub.add_parser("join", help="join a fleet: run a SuperNode with this device's key, data and model store",
                       description="Runs flower-supernode in the foreground (stop it with Ctrl-C or SIGTERM): it "
                                   "connects to the fleet with TLS and this device's key (registered by the "
                                   "operator), installs signed releases into --store, and trains on --data in "
                                   "federated rounds. Only aggregates and model updates leave the device.")
    j.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the fleet's address (its gateway)")
    j.add_argument("--ca", required=True, help="the fleet's ca.crt")
    j.add_argument("--key", required=True, help="this device's node.key (see node-key)")
    j.add_argument("--store", required=True, help="the model store folder of this device")
    j.add_argument("--data", help="this device's labeled data: an .npz with x (shaped as the model's input, "
                                  "scaled as its training data) and y (class ids)")
    j.add_argument("--trust", metavar="PUBKEY", help="the release signing key (signing.pub); required when the "
                                                     "store has not pinned one yet")
    j.set_defaults(func=cmd_join)


def _open(path: str, runtime: str | None, threads: int | None):  # noqa: ANN202
    from device_agents.serving.integrity import verified_artifact
    from device_agents.serving.runtime import Model

    target = Path(path)
    if target.is_dir() and (target / "current").is_symlink():
        target = (target / "current").resolve()
    if target.is_dir():
        entry = verified_artifact(target, runtime=runtime, kind="inference")  # the bytes that were hashed
        return Model.load(entry.data, runtime=runtime, num_threads=threads), entry.sha256[:16]
    model = Model.load(target, runtime=runtime, num_threads=threads)
    return model, None


def _load_x(path: str):  # noqa: ANN202
    """The array ``x`` of an .npz (or a single .npy array), its size checked from its header before it is read."""
    from device_agents.errors import InputMismatchError
    from device_agents.files import UnsafeFileError, read_npz

    if not Path(path).is_file():
        raise InputMismatchError(f"input file {path} does not exist; give an .npz with an array x, or an .npy")
    try:
        arrays = read_npz(path, names=("x",), single_array="x")
    except UnsafeFileError as exc:
        raise InputMismatchError(str(exc)) from None
    if "x" not in arrays:
        raise InputMismatchError(f"{path} has no array 'x'; write it with numpy.savez(path, x=...)")
    return arrays["x"]


def _x_batches(path: str, batch: int, max_mib: int | None):  # noqa: ANN202
    """(shape, batches) of the array ``x`` of an .npz (or a single .npy array), read ``batch`` rows at a time (its
    header checked first)."""
    from device_agents.errors import InputMismatchError
    from device_agents.files import UnsafeFileError, iter_npz_rows

    if not Path(path).is_file():
        raise InputMismatchError(f"input file {path} does not exist; give an .npz with an array x, or an .npy")
    try:
        shape, _, batches = iter_npz_rows(path, "x", batch_rows=batch, single_array="x",
                                          max_bytes=None if max_mib is None else max_mib << 20)
    except UnsafeFileError as exc:
        raise InputMismatchError(str(exc)) from None
    if not shape:
        raise InputMismatchError(f"{path} has no array 'x'; write it with numpy.savez(path, x=...)")

    def checked():  # noqa: ANN202
        try:
            yield from batches
        except UnsafeFileError as exc:
            raise InputMismatchError(str(exc)) from None

    return shape, checked()


def _check_output(path: Path) -> None:
    """Refuse an output path that cannot be written, before any inference runs."""
    from device_agents.errors import InputMismatchError

    if path.is_dir():
        raise InputMismatchError(f"--output {path} is a folder; give a file path ending in .npy")
    if not path.parent.is_dir():
        raise InputMismatchError(f"the folder of --output {path} does not exist; create {path.parent} first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputMismatchError(f"cannot write --output {path}: {path.parent} is not writable")


def cmd_predict(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np

    from device_agents.errors import InputMismatchError
    from device_agents.serving.telemetry import Telemetry

    out = Path(args.output)
    _check_output(out)
    if args.batch < 1 or (args.max_input_mib is not None and args.max_input_mib < 1):
        raise InputMismatchError("--batch and --max-input-mib take a whole number of at least 1")
    model, version = _open(args.model, args.runtime, args.threads)
    shape, batches = _x_batches(args.input, args.batch, args.max_input_mib)
    count, single = shape[0], len(shape) == len(model.inputs[0].shape) - 1
    if single:  # one sample without the batch axis: its rows are not samples (Model.predict checks its shape)
        count, batches = 1, iter([np.concatenate(list(batches))])
    telemetry = Telemetry(model_version=version)
    with tempfile.TemporaryDirectory(prefix=".predict.", dir=out.parent) as scratch:
        partial = Path(scratch) / "y.npy"
        written = None
        with telemetry.measure(samples=count):
            done = 0
            for x in batches:
                y = np.asarray(model.predict(np.ascontiguousarray(x)), np.float32)
                y = y[None] if single else y
                if written is None:
                    written = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                                        shape=(count, *y.shape[1:]))
                written[done:done + len(y)] = y
                done += len(y)
        if written is None:
            np.save(partial, np.zeros((0,), np.float32))
        else:
            written.flush()
            del written
        os.replace(partial, out)
    if args.telemetry:
        telemetry.write(args.telemetry)
    print(f"{count} prediction{'s' * (count != 1)} -> {out} ({model.runtime.value}, {model.format.value})")
    return int(ExitCode.SUCCESS)


def cmd_bench(args: argparse.Namespace) -> int:

    from device_agents.serving.telemetry import Telemetry, peak_rss_mib

    model, version = _open(args.model, args.runtime, args.threads)
    sample = _load_x(args.input)[:1] if args.input else model.example_input()
    model.predict(sample)
    first = time.perf_counter() - _T0
    telemetry = Telemetry(model_version=version)
    for _ in range(args.repeats):
        with telemetry.measure():
            model.predict(sample)
    snap = telemetry.snapshot()
    report = {"runtime": model.runtime.value, "format": model.format.value, "model_bytes": model.size,
              "cold_start_s": round(first + _process_age_at_import(), 4), "latency_ms": snap["latency_ms"],
              "peak_rss_mib": round(peak_rss_mib(), 1), "repeats": args.repeats}
    if args.json:
        print(json.dumps(report))
    else:
        lat = report["latency_ms"]
        print(f"{report['runtime']} {report['format']} ({report['model_bytes']:,} bytes): cold start "
              f"{report['cold_start_s']:.3f} s, latency p50 {lat['p50']:.4f} ms, p90 {lat['p90']:.4f} ms, "
              f"p99 {lat['p99']:.4f} ms, peak RSS {report['peak_rss_mib']} MiB")
    return int(ExitCode.SUCCESS)


def _process_age_at_import() -> float:
    """Seconds from process start to this module's import (Linux; 0 elsewhere)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime_now = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_now - start - (time.perf_counter() - _T0))
    except (OSError, ValueError, IndexError):
        return 0.0


def cmd_install(args: argparse.Namespace) -> int:
    from device_agents.store.model_store import ModelStore

    store = ModelStore(args.store, trust=args.trust)
    before = store.current
    target = store.install(args.model, runtime=args.runtime)
    release = store.release_version() if (target / "release.json").is_file() else None
    print(f"installed {target.name}" + (f" (signed release {release})" if release is not None else " (unsigned)")
          + f" as current in {args.store}" + (f" (previous: {before.name})" if before and before != target else ""))
    return int(ExitCode.SUCCESS)


def _existing_store(path: str) -> str:
    """``path``, refused when it is not a store folder: status and rollback create nothing (a mistyped path)."""
    from device_agents.errors import InputMismatchError

    if not Path(path).is_dir():
        raise InputMismatchError(f"store {path} does not exist; give the --store folder this device installs into")
    return path


def cmd_status(args: argparse.Namespace) -> int:
    from device_agents.store.model_store import ModelStore

    status = ModelStore(_existing_store(args.store)).status()
    if args.json:
        print(json.dumps(status))
        return int(ExitCode.SUCCESS)
    for name in ("current", "previous"):
        info = status[name]
        print(f"{name}: " + ("none" if info is None else
                             f"{info['id']} ({info['kind']}, " + (f"release {info['release']})" if info["release"]
                                                                  is not None else "unsigned)")))
    print(f"highest release installed: {status['highest_release']}; pinned key: {status['trusted_key'] or 'none'}")
    return int(ExitCode.SUCCESS)


def cmd_rollback(args: argparse.Namespace) -> int:
    from device_agents.store.model_store import ModelStore

    target = ModelStore(_existing_store(args.store)).rollback()
    print(f"rolled back: current is {target.name}")
    return int(ExitCode.SUCCESS)


def cmd_node_key(args: argparse.Namespace) -> int:
    from device_agents.errors import InputMismatchError
    from device_agents.federated.join import make_node_key

    out = Path(args.out)
    if (out / "node.key").exists() or (out / "node.pub").exists():
        raise InputMismatchError(f"{out / 'node.key'} already exists; a device key is never replaced")
    if out.exists() and not out.is_dir():
        raise InputMismatchError(f"{out} is a file; give a folder for the key pair")
    private, public = make_node_key(out, "node")
    print(f"wrote {private} (stays on this device) and {public} (give it to the fleet operator to register)")
    return int(ExitCode.SUCCESS)


def cmd_join(args: argparse.Namespace) -> int:
    import signal
    import subprocess
    import threading

    from device_agents.errors import InputMismatchError
    from device_agents.federated.join import supernode_command
    from device_agents.store.model_store import ModelStore

    store = Path(args.store)
    trust = Path(args.trust) if args.trust else None
    if trust is None and not (store / "trusted.pub").is_file():
        raise InputMismatchError(f"store {store} trusts no release key yet; give the fleet's signing.pub")
    if trust is not None:
        ModelStore(store, trust=trust).trusted_key()  # refuses a key other than the pinned one, now
    command, env = supernode_command(args.superlink, Path(args.ca), Path(args.key), store,
                                     data=Path(args.data) if args.data else None, trust=trust)
    print(f"joining the fleet at {args.superlink} (store {store}); Ctrl-C to leave", flush=True)
    proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    reasons: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stdout, reasons), daemon=True)
    relay.start()
    code = proc.wait()
    try:  # what the SuperNode started (its SuperExec) goes with it, so its output ends too
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    relay.join(timeout=10)
    if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
        reason = reasons[-1] if reasons else "see its log above"
        print(f"edgekit-agent: error: the SuperNode exited with code {code}: {reason}", file=sys.stderr)
        return int(ExitCode.FAILURE)
    return int(ExitCode.SUCCESS)


def _relay(stream: Any, reasons: list[str]) -> None:
    """Copy the SuperNode's output to ours as it comes; collect Flower's own error reports (its exit-code block:
    "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode." for a key the fleet did not register)."""
    import re

    block: list[str] | None = None
    echo = True
    for line in stream:  # read to the end whatever happens to our stdout, so the SuperNode never blocks on its pipe
        if echo:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):  # our reader went away (`join | head`): keep draining, silently
                echo = False
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if re.match(r"^ERROR\s*:", plain):
            block = [re.sub(r"^ERROR\s*:\s*", "", plain)]
        elif block is not None and plain and not plain.startswith("For more information"):
            block.append(plain)
        if block is not None and (not plain or plain.startswith("For more information")):
            reasons.append(" ".join(block)[:300])
            block = None
    if block:
        reasons.append(" ".join(block)[:300])


def _die_with_parent() -> None:
    """In the SuperNode child (Linux): receive SIGTERM when this agent dies, even by SIGKILL, so no SuperNode is
    left running without its supervisor. Elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return int(ExitCode.BAD_INPUT)
    from device_agents.errors import AgentError

    quiet_native_logs()
    return run("edgekit-agent", lambda: args.func(args), (AgentError,))


if __name__ == "__main__":
    sys.exit(main())
