"""edgekit: put trained Keras models on edge devices.

Compress (prune, quantize, distill), export (TFLite, ONNX), verify every artifact in its own
runtime, write a manifest and a report, export a trainable artifact, and federate it with Flower.
Importing edgekit does not import TensorFlow.

The packages follow the path a model takes (each imports only the ones before it)::

    loading -> optimize -> export -> artifacts -> compression -> trainable -> federated

>>> import edgekit
>>> result = edgekit.compress("cnn.keras", "digits", "out",                  # doctest: +SKIP
...                           config=edgekit.CompressConfig(max_accuracy_drop=1.0))
"""

from edgekit._version import __version__
from edgekit.artifacts.inspection import inspect_artifact
from edgekit.compression import ArtifactResult, CandidateResult, CompressResult, compress
from edgekit.config import BatchNorm, CompressConfig, Format, Quantization, Recipe, SizeMetric, TrainingConfig
from edgekit.errors import (
    BudgetError,
    ConversionError,
    DataError,
    EdgeKitError,
    FederationError,
    InputError,
    ModelLoadError,
    OutputError,
    UnsupportedLayerError,
    VerificationError,
)
from edgekit.federated.config import (
    DeployConfig,
    Partition,
    PartitionScheme,
    RoundSettings,
    SimulationConfig,
    Strategy,
)
from edgekit.federated.deploy import up
from edgekit.federated.run import FederatedResult
from edgekit.federated.simulate import simulate
from edgekit.loading.data import Dataset, load_data, load_digits
from edgekit.loading.models import LoadedModel, import_custom_objects, load_model
from edgekit.trainable.export import TrainableConfig, TrainableResult, export_trainable

__all__ = [
    "ArtifactResult",
    "BatchNorm",
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
    "FederationError",
    "Format",
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "OutputError",
    "Partition",
    "PartitionScheme",
    "Quantization",
    "Recipe",
    "RoundSettings",
    "SimulationConfig",
    "SizeMetric",
    "Strategy",
    "TrainableConfig",
    "TrainableResult",
    "TrainingConfig",
    "UnsupportedLayerError",
    "VerificationError",
    "__version__",
    "compress",
    "export_trainable",
    "import_custom_objects",
    "inspect_artifact",
    "load_data",
    "load_digits",
    "load_model",
    "simulate",
    "up",
]
