"""``edgekit fl run``: federated rounds on a served fleet, with the devices' own data.

Each device trains the trainable artifact it has installed (a signed trainable release rolled out to it:
the store's current version when it is trainable, else its newest trainable one) on the data it joined
with; the server holds only held-out evaluation data (``data``) and the model. The run folder gets what
``fl simulate`` writes: ``history.json``, ``accuracy.png`` and a verified ``final/``, ready to release.

>>> run_on_fleet("cnn.keras", "server_eval.npz", "run", "fleet", FleetRunConfig(clients=4))   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgekit.errors import FederationError, InputError
from edgekit.federated.config import FederationConfig
from edgekit.federated.run import FederatedResult, RunSpec


@dataclass(frozen=True)
class FleetRunConfig(FederationConfig):
    """A run on a served fleet: ``clients`` devices must be connected (the run waits for them);
    ``timeout`` bounds the whole run in seconds. ``partition`` is unused: each device has its own data."""

    LOCAL_PARTITIONS: ClassVar[bool] = False
    clients: int = 2
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.timeout <= 7 * 86_400:
            raise InputError(f"the run timeout must be between 0 and 7 days in seconds, got {self.timeout}")


def run_on_fleet(model: Any, data: Any, out: str | Path, fleet: str | Path, config: FleetRunConfig | None = None,
                 *, progress: bool = True, log: Any = print) -> FederatedResult:
    """Run the federated rounds of ``model`` on the devices of the served ``fleet``; evaluate on ``data``."""
    from edgekit._io import check_output_dir
    from edgekit.federated.deploy import finish_deployed_run
    from edgekit.federated.run import prepare_run
    from edgekit.federated.submit import served, submit_job

    config = config or FleetRunConfig()
    served(fleet)  # refused before anything is written
    out = Path(out).absolute()
    check_output_dir(out)
    run = prepare_run(model, data, out, config, progress=progress)
    for line in run.warnings:
        log(line)
    RunSpec(clients=config.clients, rounds=config.rounds, personalize_epochs=config.personalize_epochs,
            fleet=str(Path(fleet).absolute())).write(out)
    result = submit_job(fleet, "train", {"run_dir": str(out)}, timeout=config.timeout, log=log)
    if result.get("status") == "refused":
        raise FederationError(f"the federated run was refused before round 1: {result['reason']}")
    if result.get("status") != "complete" or not (out / "history.json").is_file():
        raise FederationError(f"the federated run on the fleet failed: {result.get('reason', 'no history')} "
                              f"(job folder {result['job']})")
    return finish_deployed_run(run, out, config, progress=progress, log=log)
