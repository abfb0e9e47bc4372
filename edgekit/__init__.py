"""edgekit: put trained Keras models on edge devices.

Compress (prune, quantize, distill), export (TFLite, ONNX), verify every artifact in its own
runtime, and write a manifest and a report. Importing edgekit does not import TensorFlow.

>>> import edgekit
>>> result = edgekit.compress("cnn.keras", "digits", "out",                  # doctest: +SKIP
...                           config=edgekit.CompressConfig(max_accuracy_drop=1.0))
"""

from edgekit._pipeline import ArtifactResult, CandidateResult, CompressResult, compress
from edgekit._trainable_api import TrainableConfig, TrainableResult, export_trainable
from edgekit._version import __version__
from edgekit.config import CompressConfig, Format, Quantization, Recipe, SizeMetric, TrainingConfig
from edgekit.data import Dataset, load_data, load_digits
from edgekit.errors import (
    BudgetError,
    ConversionError,
    DataError,
    EdgeKitError,
    InputError,
    ModelLoadError,
    OutputError,
    UnsupportedLayerError,
    VerificationError,
)
from edgekit.federated.deploy import DeployConfig, up
from edgekit.federated.server_app import RoundSettings
from edgekit.federated.simulate import FederatedResult, SimulationConfig, simulate
from edgekit.inspect import inspect_artifact
from edgekit.models import LoadedModel, load_model

__all__ = [
    "ArtifactResult",
    "BudgetError",
    "CandidateResult",
    "CompressConfig",
    "CompressResult",
    "ConversionError",
    "DataError",
    "Dataset",
    "DeployConfig",
    "EdgeKitError",
    "FederatedResult",
    "Format",
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "OutputError",
    "Quantization",
    "Recipe",
    "RoundSettings",
    "SimulationConfig",
    "SizeMetric",
    "TrainableConfig",
    "TrainableResult",
    "TrainingConfig",
    "UnsupportedLayerError",
    "VerificationError",
    "__version__",
    "compress",
    "export_trainable",
    "inspect_artifact",
    "load_data",
    "load_digits",
    "load_model",
    "simulate",
    "up",
]
