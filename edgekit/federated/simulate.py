"""``edgekit fl simulate``: a federated run on Flower's simulation engine (Ray), on one machine."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgekit._io import check_output_dir, owned, temp_dir
from edgekit.errors import EdgeKitError, FederationError
from edgekit.federated.config import SimulationConfig
from edgekit.federated.processes import FLOWER_ENV
from edgekit.federated.run import FederatedResult, PreparedRun, finish_run, prepare_run
from edgekit.federated.server_app import run_rounds
from edgekit.loading.data import Dataset


def simulate(model: Any, data: str | Path | Dataset, out: str | Path, *, config: SimulationConfig | None = None,
             progress: bool = True, log: Any = print) -> FederatedResult:
    """Run federated training in simulation; write history, plot, checkpoints and the final int8 model.

    >>> from edgekit.federated.config import Partition, PartitionScheme
    >>> simulate("cnn.keras", "digits", "fl_out",                                # doctest: +SKIP
    ...          config=SimulationConfig(clients=10, partition=Partition(PartitionScheme.DIRICHLET, 0.5)))
    """
    from device_agents.training.trainer import Trainer

    config = config or SimulationConfig()
    out = Path(out).absolute()
    if not (config.resume and owned(out) and (out / "checkpoints" / "state.json").exists()):
        check_output_dir(out)
    for key, value in FLOWER_ENV.items():
        os.environ[key] = value
    run = prepare_run(model, data, out, config, progress=progress, reuse_trainable=config.resume)
    for line in run.warnings:
        log(line)
    evaluator = Trainer.load(out / "trainable")
    personalization = None
    if config.secure_aggregation:
        history, weights = _secagg_rounds(config, out, evaluator, run, log)
    else:
        history, weights, personalization = _rounds(config, out, evaluator, run, log)
    return finish_run(run, out, config, history, weights, progress=progress, log=log,
                      extra={"personalization": personalization} if personalization else None)


def _rounds(config: SimulationConfig, out: Path, evaluator: Any, run: PreparedRun,
            log: Any) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, Any] | None]:
    from flwr.serverapp import ServerApp

    from device_agents.federated.client_app import ClientSettings, make_client_app
    from device_agents.protocol import ClientLimits

    outcome: dict[str, Any] = {}
    initial = evaluator.get_weights()
    server_app = ServerApp()
    stopped = threading.Event()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            outcome["weights"], outcome["state"] = run_rounds(
                _StoppableGrid(grid, stopped), settings=config.rounds, initial=initial, evaluator=evaluator,
                eval_x=run.parts.evaluation.x, eval_y=run.parts.evaluation.y, checkpoint_dir=out / "checkpoints",
                resume=config.resume, expected_nodes=config.clients, log=log,
                personalize_epochs=config.personalize_epochs)
        except BaseException as exc:  # the simulation engine would only log it
            outcome["error"] = exc

    limits = ClientLimits(local_dp_epsilon=config.local_dp_epsilon, local_dp_clip=config.rounds.dp_clipping_norm,
                          local_dp_delta=config.rounds.dp_delta)
    client_app = make_client_app(ClientSettings(str(out / "trainable"), str(out / "partitions"), dict(config.faults),
                                                audit_dir=config.audit_dir, limits=limits))
    _run_simulation(server_app, client_app, config.clients, stopped, log)
    if "error" in outcome:
        exc = outcome["error"]
        raise exc if isinstance(exc, EdgeKitError) else FederationError(f"the federated run failed: {exc}")
    if "state" not in outcome:
        raise FederationError("the federated run ended without a result; see the Flower log above")
    return outcome["state"].history, outcome["weights"], outcome["state"].personalization


def _secagg_rounds(config: SimulationConfig, out: Path, evaluator: Any, run: PreparedRun,
                   log: Any) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    from device_agents.federated.client_app import ClientSettings, make_secagg_client_app
    from edgekit.federated.secagg import make_secagg_server_app

    outcome: dict[str, Any] = {}
    stopped = threading.Event()
    server_app = make_secagg_server_app(settings=config.rounds, names=list(evaluator.tensors),
                                        initial=evaluator.get_weights(), evaluator=evaluator,
                                        eval_x=run.parts.evaluation.x, eval_y=run.parts.evaluation.y,
                                        clients=config.clients, log=log, outcome=outcome,
                                        grid_of=lambda grid: _StoppableGrid(grid, stopped))
    client_app = make_secagg_client_app(ClientSettings(str(out / "trainable"), str(out / "partitions")))
    _run_simulation(server_app, client_app, config.clients, stopped, log)
    if "error" in outcome:
        raise FederationError(f"the secure-aggregation run failed: {outcome['error']}")
    if "history" not in outcome:
        raise FederationError("the secure-aggregation run ended without a result; see the Flower log above")
    return outcome["history"], outcome["weights"]


def _run_simulation(server_app: Any, client_app: Any, clients: int, stopped: threading.Event, log: Any) -> None:
    """Run the apps on Flower's simulation engine; ``stopped``: set by Ctrl-C or SIGTERM, and watched by the
    ServerApp's grid (:class:`_StoppableGrid`; see :func:`_stopping`)."""
    import logging

    from flwr.simulation import run_simulation

    flower = logging.getLogger("flwr")  # edgekit prints its own line per round; Flower's errors still show
    flower.setLevel(logging.ERROR)
    flower.propagate = False

    temp = str(temp_dir("ray"))  # 0700, removed when the run ends (or by a later run, if this one is killed)
    try:
        _start_ray(temp)  # Flower's backend uses a running Ray and shuts it down when the run ends
        with _stopping(flower, stopped, log):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


class _Stopped(Exception):
    """The run was stopped (Ctrl-C, SIGTERM) while the ServerApp waited for replies."""


class _StoppableGrid:
    """Flower's grid, whose ``send_and_receive`` gives up when ``stopped`` is set: its own waits out the round's
    timeout, and the ServerApp's thread (not a daemon) held the process for that long after a Ctrl-C."""

    def __init__(self, grid: Any, stopped: threading.Event) -> None:
        self._grid, self._stopped = grid, stopped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Flower's ``InMemoryGrid.send_and_receive`` (push, then pull until every reply is in or the timeout),
        checking ``stopped`` at every pull."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while waiting and (end is None or time.monotonic() < end):
            if self._stopped.is_set():
                raise _Stopped("the run was stopped")
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {message.metadata.reply_to_message_id for message in pulled}
            if waiting:
                time.sleep(getattr(self._grid, "pull_interval", 0.1))
        return replies


@contextmanager
def _stopping(flower: Any, stopped: threading.Event, log: Any) -> Iterator[None]:
    """Ctrl-C or SIGTERM during a simulation. The first sets ``stopped``: the ServerApp stops at its next wait for
    replies, the devices finish the work they hold, Ray shuts down, and the run ends as a KeyboardInterrupt (the
    CLI's "interrupted", exit 130), its checkpoints kept for a resume (SecAgg+ runs keep none). A second one
    interrupts at once, and Flower's log is dropped from then on.

    Interrupted at once, Flower shut Ray down while its threads still waited for the devices' replies: one thread
    per busy device then waited forever in ``ray.get``, holding the process after "interrupted", and Flower's
    threads logged every device still training with its traceback."""
    import logging
    import signal

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread alone
        yield
        return
    aborted = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopped.is_set():
            stopped.set()
            log("stopping: the devices finish the work they hold, then the run ends; interrupt again to stop at once")
            return
        aborted.set()
        raise KeyboardInterrupt

    class UntilAborted(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not aborted.is_set()

    guard = UntilAborted()
    flower.addFilter(guard)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        aborted.set()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if aborted.is_set():
            flower.setLevel(logging.CRITICAL + 1)  # its threads may still log after this returns
        flower.removeFilter(guard)
    if stopped.is_set():
        raise KeyboardInterrupt


def _start_ray(temp: str) -> None:
    """Ray as Flower's backend starts it, each worker a simulated device: a device holds no TensorFlow (the agent
    runs LiteRT), and Flower's actor module imports TensorFlow when it can, only to offer GPU memory growth, which
    took about 9 s of CPU in each worker of every simulation (two workers: the first round of a three-client run took
    10 s, the next 0.7 s).

    Ray's processes inherit this process's environment when it starts them: ``PYTHONPATH`` carries the driver's
    ``sys.path`` to the workers, behind a folder in ``temp`` whose ``tensorflow`` fails to import as a missing module.
    A Ray ``runtime_env`` did the same (environment variables and a setup hook per worker), but it starts each worker
    through Ray's runtime-environment agent: about 3 s more CPU a simulation (measured: 10-11 s for a Ray start and
    two tasks with it, 7-8 s without)."""
    import sys

    import ray

    device_python = Path(temp) / "device-python" / "tensorflow"
    device_python.mkdir(parents=True)
    (device_python / "__init__.py").write_text(
        'raise ModuleNotFoundError("a simulated device holds no TensorFlow", name="tensorflow")\n')
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(device_python.parent), *sys.path, *filter(None, [before])])
    try:
        ray.init(num_cpus=min(2, os.cpu_count() or 1), _temp_dir=temp, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before

