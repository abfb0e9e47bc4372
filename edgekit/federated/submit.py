"""Jobs on a served federation: the served SuperLink of a folder (``serve.json``, written by
:func:`edgekit.fleet.serve.serve`), and one job run on it with ``flwr run`` (the job's ServerApp is
:func:`edgekit.federated.server_apps.job_server_app`; it writes ``result.json`` beside ``job.json``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from device_agents.files import locked, write_atomic
from edgekit.errors import FederationError, InputError
from edgekit.federated.processes import flower_env, flwr_run

SERVE_STATE = "serve.json"
"""The file of a served folder: its gateway, its loopback control address, its CA, the serving process."""
FEDERATION = "fleet"
"""The federation name of a served folder in its ``flwr_home/config.toml``."""
REPORT_PREFIX = "edgekit: "
"""Lines a job's ServerApp prints for the operator (relayed by :func:`submit_job`)."""


def answers(address: str) -> bool:
    """Whether something accepts connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) == 0


def served(folder: str | Path) -> dict[str, Any]:
    """The serve state of ``folder``, or :class:`InputError` when it is not being served."""
    folder = Path(folder).absolute()
    state = folder / SERVE_STATE
    if not state.is_file():
        raise InputError(f"{folder} is not a served fleet (no {SERVE_STATE}); serve it first")
    info = json.loads(state.read_text())
    if not answers(info["control"]):
        raise InputError(f"the fleet in {folder} is not being served (nothing answers on {info['control']}); "
                         "serve it first")
    return {**info, "folder": folder}


def submit_job(folder: str | Path, action: str, spec: dict[str, Any], *, timeout: float, log: Any = print) -> dict:
    """Run one job (``action`` of the served app's job registry, e.g. :data:`edgekit.fleet.jobs.ACTIONS`) on the
    federation served from ``folder``; return its result.

    >>> submit_job("fleet", "status", {"timeout": 60}, timeout=180)          # doctest: +SKIP
    {'status': 'complete', 'nodes': [...], 'job': '.../jobs/...-status-...'}
    """
    info = served(folder)
    job_dir = info["folder"] / "jobs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{action}-{os.getpid()}"
    job_dir.mkdir(parents=True)
    job = job_dir / "job.json"
    write_atomic(job, json.dumps({"action": action, **spec}).encode())
    try:
        with locked(info["folder"] / "jobs"):  # one job at a time: a rollout and a convergence pass never interleave
            proc = flwr_run(info["folder"] / "app", FEDERATION, flower_env(info["folder"] / "flwr_home"),
                            timeout=timeout, run_config=f'job="{job}"')
    except subprocess.TimeoutExpired:
        raise FederationError(f"the {action} job did not finish in {timeout:.0f} s (job folder {job_dir})") from None
    (job_dir / "flwr-run.log").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if REPORT_PREFIX in line:  # what the job's ServerApp reports (Flower prefixes its log lines)
            log(line.split(REPORT_PREFIX, 1)[1])
    result = job_dir / "result.json"
    if not result.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[:400]
        raise FederationError(f"the {action} job wrote no result (flwr run code {proc.returncode}): {tail} "
                              f"(log: {job_dir / 'flwr-run.log'})")
    return {**json.loads(result.read_text()), "job": str(job_dir)}
