"""edgekit's device agent: run, verify, install and train edgekit artifacts with LiteRT,
tflite-runtime or onnxruntime.

Never imports TensorFlow, nor anything of ``edgekit`` or ``tools``: it is its own distribution
(``edgekit-device-agent``). Importing this package imports only numpy; runtimes load on first use.

>>> from device_agents import Model
>>> model = Model.load("out/model.tflite")          # doctest: +SKIP
"""

from device_agents.errors import (
    AgentError,
    ArtifactError,
    InputMismatchError,
    InstallError,
    IntegrityError,
    ReleaseError,
    StatsError,
)
from device_agents.exit_codes import ExitCode
from device_agents.serving.runtime import ArtifactFormat, Model, Runtime, TensorSpec, available_runtimes
from device_agents.serving.telemetry import Telemetry
from device_agents.store.model_store import ModelStore
from device_agents.store.serving import ServedModel
from device_agents.training.trainer import Trainer

__all__ = [
    "AgentError",
    "ArtifactError",
    "ArtifactFormat",
    "ExitCode",
    "InputMismatchError",
    "InstallError",
    "IntegrityError",
    "Model",
    "ModelStore",
    "ReleaseError",
    "Runtime",
    "ServedModel",
    "StatsError",
    "Telemetry",
    "TensorSpec",
    "Trainer",
    "available_runtimes",
]
