"""edgekit's device agent: run, verify and train edgekit artifacts with LiteRT or onnxruntime.

Never imports TensorFlow. Importing this package imports only numpy; runtimes load on first use.
"""

from device_agents.errors import AgentError, ArtifactError, InputMismatchError, InstallError, IntegrityError
from device_agents.runtime import ArtifactFormat, Model, Runtime, TensorSpec, available_runtimes

__all__ = [
    "AgentError",
    "ArtifactError",
    "ArtifactFormat",
    "InputMismatchError",
    "InstallError",
    "IntegrityError",
    "Model",
    "Runtime",
    "TensorSpec",
    "available_runtimes",
]
