"""edgekit: put trained Keras models on edge devices.

Compress (prune, quantize, distill), export (TFLite, ONNX), verify every artifact in its own
runtime, write a manifest and a report, export a trainable artifact, federate it with Flower, and sign
releases and roll them out to a fleet of devices behind canary gates.
Importing edgekit does not import TensorFlow.

The packages follow the path a model takes (each imports only the ones before it)::

    loading -> optimize -> export -> artifacts -> compression -> trainable -> federated -> fleet

>>> import edgekit
>>> result = edgekit.compress("cnn.keras", "digits", "out",                  # doctest: +SKIP
...                           config=edgekit.CompressConfig(max_accuracy_drop=1.0))
"""

from edgekit._version import __version__
from edgekit.artifacts.inspection import inspect_artifact
from edgekit.artifacts.results import ArtifactResult, CandidateResult, CompressResult
from edgekit.compression import compress
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
    RolloutError,
    UnsupportedLayerError,
    VerificationError,
)
from edgekit.federated.config import (
    DeployConfig,
    OversizedUpdate,
    Partition,
    PartitionScheme,
    RoundSettings,
    SimulationConfig,
    Strategy,
)
from edgekit.federated.deploy import up
from edgekit.federated.fleet_run import FleetRunConfig, run_on_fleet
from edgekit.federated.run import FederatedResult
from edgekit.federated.simulate import simulate
from edgekit.fleet.metrics import MetricsAddress
from edgekit.fleet.rollout import Gates, RolloutConfig, converge, fleet_status, rollout
from edgekit.fleet.serve import FleetConfig
from edgekit.fleet.signing import new_keys, sign_release
from edgekit.fleet.watch import WatchConfig
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
    "FleetConfig",
    "FleetRunConfig",
    "Format",
    "Gates",
    "InputError",
    "LoadedModel",
    "MetricsAddress",
    "ModelLoadError",
    "OutputError",
    "OversizedUpdate",
    "Partition",
    "PartitionScheme",
    "Quantization",
    "Recipe",
    "RolloutConfig",
    "RolloutError",
    "RoundSettings",
    "SimulationConfig",
    "SizeMetric",
    "Strategy",
    "TrainableConfig",
    "TrainableResult",
    "TrainingConfig",
    "UnsupportedLayerError",
    "VerificationError",
    "WatchConfig",
    "__version__",
    "compress",
    "converge",
    "export_trainable",
    "fleet_status",
    "import_custom_objects",
    "inspect_artifact",
    "load_data",
    "load_digits",
    "load_model",
    "new_keys",
    "rollout",
    "run_on_fleet",
    "sign_release",
    "simulate",
    "up",
]
