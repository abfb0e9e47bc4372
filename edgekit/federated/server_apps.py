"""The ServerApps edgekit deploys, together: the rounds of a prepared run folder (``fl up``, and ``fl run`` through
the fleet's train job) and the job runner of a served federation (``fleet serve``: one job per ``flwr run``).
The round loop itself is :mod:`edgekit.federated.server_app`.

A Flower app names its ServerApp as ``module:factory``
(:func:`~edgekit.federated.processes.write_flower_app`); :func:`deployed_server_app` is ``fl up``'s, and
:func:`job_server_app` builds the fleet's from its job registry (:data:`edgekit.fleet.jobs.ACTIONS`).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.files import write_atomic
from edgekit.federated.submit import REPORT_PREFIX


def deployed_server_app() -> Any:
    """The ServerApp of ``edgekit fl up``: everything it needs is in the run folder (``run-dir``)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        run_rounds_in(grid, Path(str(context.run_config["run-dir"])))

    return app


def run_rounds_in(grid: Any, run_dir: Path, log: Any = print) -> None:
    """The rounds of a prepared run folder (``run.json``, ``trainable/``, ``evaluation.npz``) on ``grid``;
    writes ``final_weights.npz``, ``history.json`` and ``accuracy.png`` there."""
    from device_agents.training.trainer import Trainer
    from edgekit.federated.run import RunSpec, plot_history
    from edgekit.federated.server_app import run_rounds

    spec = RunSpec.read(run_dir)
    evaluator = Trainer.load(run_dir / "trainable")
    with np.load(run_dir / "evaluation.npz") as npz:
        eval_x, eval_y = npz["x"], npz["y"]
    weights, state = run_rounds(grid, settings=spec.rounds, initial=evaluator.get_weights(), evaluator=evaluator,
                                eval_x=eval_x, eval_y=eval_y, checkpoint_dir=run_dir / "checkpoints",
                                resume=False, expected_nodes=spec.clients, log=log,
                                personalize_epochs=spec.personalize_epochs)
    np.savez(run_dir / "final_weights.npz", **weights)
    (run_dir / "history.json").write_text(json.dumps({"config": json.loads(spec.to_json()), "rounds": state.history,
                                                      "personalization": state.personalization}, indent=2))
    plot_history(state.history, run_dir / "accuracy.png")


Action = Callable[[Any, dict[str, Any]], dict[str, Any]]


def job_server_app(actions: dict[str, Action]) -> Any:
    """A ServerApp that runs the job named by the run config's ``job`` (a ``job.json``) with ``actions[action]``
    and writes its JSON result beside it; a failing job writes its reason (and ``traceback.txt``)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        job_path = Path(str(context.run_config["job"]))
        job = json.loads(job_path.read_text())
        try:
            result = actions[job["action"]](grid, job)
        except Exception as exc:  # noqa: BLE001 (the operator's command reports it as one line)
            (job_path.parent / "traceback.txt").write_text(traceback.format_exc())
            result = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        write_atomic(job_path.parent / "result.json", json.dumps(result, indent=2).encode())

    return app


def report(line: str) -> None:
    """A line for the operator of a job (:func:`~edgekit.federated.submit.submit_job` relays it)."""
    print(f"{REPORT_PREFIX}{line}", flush=True)
