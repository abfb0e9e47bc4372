"""The exceptions edgekit raises.

Every error edgekit raises on purpose is an :class:`EdgeKitError`; the CLI prints its message
on one line and exits with the error's ``exit_code`` (the table: :mod:`device_agents.exit_codes`).
Messages name values and numbers, never command-line flags. The tree is small on purpose::

    EdgeKitError                exit code 1
    ├── InputError              exit code 2: a bad argument or option value
    │   ├── ModelLoadError      a model file that is missing, corrupt or of an unknown format
    │   ├── UnsupportedLayerError  a layer edgekit cannot rebuild, prune, quantize or train
    │   ├── DataError           data that does not fit the model (shape, dtype, labels, NaN/inf)
    │   └── OutputError         an output folder that cannot be written
    ├── ConversionError         a converter (TFLite, tf2onnx, ORT quantizer) failed
    ├── VerificationError       an artifact disagrees with its source beyond the tolerance
    ├── FederationError         a federated run failed (a Flower process, no clients, a failed round loop)
    ├── RolloutError            exit code 4: a fleet rollout stopped at its canary (rolled back) or was partial
    └── BudgetError             exit code 3: no candidate met the accuracy budget (the report is kept)
"""

from __future__ import annotations

from device_agents.exit_codes import ExitCode


class EdgeKitError(Exception):
    """Base class of every error edgekit raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class InputError(EdgeKitError):
    """A bad argument or option value given by the user."""

    exit_code = ExitCode.BAD_INPUT


class ModelLoadError(InputError):
    """The model file is missing, corrupt or of a format edgekit does not read."""


class UnsupportedLayerError(InputError):
    """The model uses a layer edgekit cannot handle for the requested operation."""

    def __init__(self, message: str, *, layer_name: str, layer_type: str) -> None:
        super().__init__(message)
        self.layer_name = layer_name
        self.layer_type = layer_type


class DataError(InputError):
    """The data does not fit the model, or holds invalid values."""


class OutputError(InputError):
    """The output location cannot be written."""


class ConversionError(EdgeKitError):
    """A converter failed on a model edgekit accepted."""


class VerificationError(EdgeKitError):
    """An artifact's outputs disagree with the source model beyond the tolerance."""

    def __init__(self, message: str, *, max_abs_diff: float, tolerance: float, artifact: str) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.artifact = artifact


class FederationError(EdgeKitError):
    """A federated run failed: a Flower process exited, no client connected, or the round loop failed."""


class BudgetError(EdgeKitError):
    """No candidate recipe met the accuracy budget; the report was still written."""

    exit_code = ExitCode.BUDGET_NOT_MET

    def __init__(self, message: str, *, budget: float, best_drop: float | None, report: str | None) -> None:
        super().__init__(message)
        self.budget = budget
        self.best_drop = best_drop
        self.report = report


class RolloutError(EdgeKitError):
    """A rollout stopped: the canary failed a gate (its devices rolled back), or later devices refused.
    ``result`` holds every device's answer."""

    exit_code = ExitCode.ROLLOUT_STOPPED

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result or {}
