"""``edgekit.export_trainable``: write a verified trainable TFLite artifact and its manifest."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.training.trainer import TRAIN_INPUTS
from edgekit._io import StagedDir
from edgekit._progress import Progress
from edgekit.artifacts.manifest import trainable_manifest, write_manifest
from edgekit.config import Quantization
from edgekit.errors import InputError, VerificationError
from edgekit.loading.data import Dataset, fit_to_model, load_data
from edgekit.loading.models import float_pixels, load_model, load_warnings, pin_input

PARITY_TOLERANCE = 1e-5
PARITY_RTOL = 1e-2
"""One train step matches TensorFlow's when, for every weight tensor, the difference is within
``PARITY_TOLERANCE`` (max abs) or its L2 norm is within ``PARITY_RTOL`` of the L2 norm of the change
TensorFlow made to that tensor. Small models match to 1e-6; in a deep untrained network (MobileNetV3,
steps of size 5) float32 sums in another order move a few pre-activations across a ReLU6 kink, which
changes the first layers' gradients by ~0.2% (L2). A wrong gradient is off by tens of percent."""


@dataclass(frozen=True)
class TrainableConfig:
    """Options of :func:`export_trainable`.

    ``head_only``: the backbone becomes an int8 ``backbone.tflite`` and only the head trains (a dynamic-range
    backbone, int8 weights with float activations, where full int8 changes the model's top-1 prediction on more
    samples than :data:`BACKBONE_AGREEMENT` allows and it changes fewer).
    ``batch_size``: the fixed batch of the ``train`` signature (pad short batches with weight 0).
    """

    head_only: bool = False
    batch_size: int = 32
    learning_rate: float = 0.05  # a suggested default, stored in the manifest

    def __post_init__(self) -> None:
        if not 1 <= int(self.batch_size) <= 4096:
            raise InputError(f"the train batch size must be between 1 and 4096, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise InputError(f"learning rate must be > 0, got {self.learning_rate}")


@dataclass
class TrainableResult:
    out: Path | None
    manifest: dict[str, Any]
    files: dict[str, bytes]
    # what the user should hear: data outside the model's own preprocessing range, an int8 backbone that changes
    # the model's predictions
    warnings: list[str] = field(default_factory=list)


def export_trainable(model: Any, out: str | Path | None, *, data: str | Path | Dataset | None = None,
                     config: TrainableConfig | None = None, progress: bool = True) -> TrainableResult:
    """Export ``model`` as a trainable TFLite artifact (``trainable.tflite``) with ``manifest.json``.

    The artifact is initialised with the model's weights, runs in ai-edge-litert or tflite-runtime,
    and is verified before anything is written: ``infer`` reproduces the Keras model, and one
    ``train`` step gives the weights TensorFlow's own SGD step gives (within 1e-5).

    Without ``data`` the artifact is verified on synthetic inputs of the model's own shape
    (a head-only export needs real samples to calibrate its int8 backbone).

    >>> export_trainable("cnn.keras", "trainable_out")   # doctest: +SKIP
    """
    config = config or TrainableConfig()
    with StagedDir(out, kind="trainable") if out is not None else nullcontext() as stage:
        result = _export(model, data, config, Progress(enabled=progress))
        if stage is not None:
            for name, data_bytes in result.files.items():
                (stage.path / name).write_bytes(data_bytes)
            write_manifest(stage.path, result.manifest)
            result.out = stage.commit()
    return result


def _export(model: Any, data: str | Path | Dataset | None, config: TrainableConfig,
            bars: Progress) -> TrainableResult:
    from device_agents.training.trainer import Trainer
    from edgekit.trainable.graph import build_module, build_nodes, convert, reference_step

    raw = None if data is None else load_data(data)
    loaded = float_pixels(load_model(model, sample=None if raw is None else raw.x[:64]))
    if loaded.input_dtype not in ("float32", "float16", "int32", "int64"):
        raise InputError(f"on-device training takes float32, int32 or int64 inputs; this model takes "
                         f"{loaded.input_dtype}")
    dataset = _verification_data(loaded, raw, config)
    loaded = pin_input(loaded, dataset.x.shape[1:])  # the artifact takes the data's shape (a graph's free size is 1)
    backbone, train_model, keras_model = _parts(loaded, config)
    build_nodes(train_model)  # refuse before any work
    files: dict[str, bytes] = {}
    kept, crash = Quantization.INT8, None
    if backbone is not None:
        with bars.step("export int8 backbone"):
            files["backbone.tflite"], kept, crash = _runnable_backbone(backbone, dataset.x[:256])
    with bars.step("build and convert the trainable model"):
        module, tensors, softmax_out = build_module(train_model, batch_size=config.batch_size)
        files["trainable.tflite"] = convert(module)
    source = {"path": loaded.path, "sha256": loaded.sha256, "format": loaded.source_format, "params": loaded.params}
    contract = _contract(loaded, train_model, tensors, softmax_out, config)

    def verified(candidate: dict[str, bytes], quantization: Quantization) -> dict[str, Any]:
        manifest = trainable_manifest(source, candidate, contract, backbone=quantization)
        manifest["verification"] = _verify(candidate, manifest, keras_model, train_model, dataset, config,
                                           reference_step, Trainer)
        return manifest

    with bars.step("verify in LiteRT"):
        manifest = verified(files, kept)
    int8_agreement = manifest["verification"]["infer_top1_agreement"]
    if backbone is not None and kept is Quantization.INT8 and int8_agreement < BACKBONE_AGREEMENT:
        with bars.step("export and verify a dynamic-range backbone"):
            files, manifest = _better_backbone(backbone, files, manifest, verified)
    if crash is None:
        said = _warnings(loaded, dataset, manifest, int8_agreement)
    else:  # no int8 backbone ran: the dynamic-range one's agreement is said with why
        said = [*_input_warnings(loaded, dataset),
                f"the int8 backbone does not run in LiteRT ({crash}): the backbone keeps int8 weights and computes in "
                f"float (dynamic range), which leaves the model's top-1 prediction unchanged on {int8_agreement:.1f}% "
                "of the samples"]
    return TrainableResult(None, manifest, files, [*said, *_augmentation_warnings(train_model)])


def _runnable_backbone(backbone: Any, calibration: np.ndarray) -> tuple[bytes, Quantization, str | None]:
    """The int8 backbone, run first in a child process (:func:`~edgekit.export.verify.probe`: LiteRT aborts the
    process on some of the converter's int8 graphs); where it fails there, a dynamic-range backbone (int8 weights,
    float activations) and why the int8 one was not kept. :class:`~edgekit.errors.ConversionError` when neither
    runs."""
    from device_agents.errors import AgentError
    from edgekit.errors import ConversionError
    from edgekit.export.tflite import to_tflite
    from edgekit.export.verify import probe

    data, _ = to_tflite(backbone, quantization=Quantization.INT8, calibration=calibration)
    try:
        probe(data, calibration)
        return data, Quantization.INT8, None
    except AgentError as exc:
        failure = str(exc)
    data, _ = to_tflite(backbone, quantization=Quantization.DYNAMIC, calibration=calibration)
    try:
        probe(data, calibration)
    except AgentError as exc:
        raise ConversionError(f"the backbone does not run in LiteRT in int8 ({failure}) or dynamic range ({exc})") \
            from None
    return data, Quantization.DYNAMIC, failure


BACKBONE_AGREEMENT = 95.0
"""Percent: a head-only export whose int8 backbone leaves the model's top-1 prediction unchanged on fewer samples
tries a dynamic-range backbone (int8 weights, float activations) and keeps the one that agrees more; one still
under this is said (the head would train on features quantization changed)."""


def _better_backbone(backbone: Any, files: dict[str, bytes], manifest: dict[str, Any],
                     verified: Callable[[dict[str, bytes], Quantization], dict[str, Any]],
                     ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The int8 backbone's files and manifest, or those of a dynamic-range backbone where it agrees more with the
    model. Full int8 quantizes every activation on a range calibrated from the data; a layer whose output is a
    large constant plus a tiny signal (a built-in Rescaling fed values far from its range) loses the signal, which
    float activations keep, with the same int8 weights (4x smaller than float32)."""
    from edgekit.export.tflite import to_tflite

    try:
        data, _ = to_tflite(backbone, quantization=Quantization.DYNAMIC, calibration=np.zeros((0,), np.float32))
        dynamic = {**files, "backbone.tflite": data}
        other = verified(dynamic, Quantization.DYNAMIC)
    except Exception:  # noqa: BLE001 (a backbone the converter or the runtime cannot take this way: int8 stays)
        return files, manifest
    if other["verification"]["infer_top1_agreement"] > manifest["verification"]["infer_top1_agreement"]:
        return dynamic, other
    return files, manifest


def _warnings(loaded: Any, dataset: Dataset, manifest: dict[str, Any], int8_agreement: float) -> list[str]:
    """What the user should hear: data outside the model's own preprocessing range; a head-only backbone int8
    changes (what was kept instead, and whether that still does)."""

    found = _input_warnings(loaded, dataset)
    if manifest["trainable"]["mode"] != "head-only" or int8_agreement >= BACKBONE_AGREEMENT:
        return found
    agreement = manifest["verification"]["infer_top1_agreement"]
    said = (f"the int8 backbone leaves the model's top-1 prediction unchanged on {int8_agreement:.1f}% of the "
            f"samples (under {BACKBONE_AGREEMENT:g}%)")
    kept = {entry["file"]: entry["quantization"] for entry in manifest["artifacts"]}["backbone.tflite"]
    if kept == Quantization.DYNAMIC.value:
        said += (f"; the backbone keeps int8 weights and computes in float (dynamic range), which leaves it "
                 f"unchanged on {agreement:.1f}%")
        if agreement >= BACKBONE_AGREEMENT:
            return [*found, said]
    return [*found, f"{said}: the head trains on features quantization changed; a full (not head-only) export "
                    "keeps the model float"]


def _input_warnings(loaded: Any, dataset: Dataset) -> list[str]:
    """A free input fixed to the data's shape; data outside the model's own preprocessing range."""
    from edgekit.loading.input_range import input_range_warnings

    users = loaded.source is not None and dataset.name != SYNTHETIC  # random inputs say nothing of the user's range
    return load_warnings(loaded) + (input_range_warnings(loaded.source, dataset.x[:256]) if users else [])


def _augmentation_warnings(train_model: Any) -> list[str]:
    """The model's data-augmentation layers, which the trainable artifact passes samples through (as at inference)."""
    from edgekit.loading.layers import AUGMENTATION_LAYERS

    names = [layer.name for layer in getattr(train_model, "layers", []) if type(layer).__name__ in AUGMENTATION_LAYERS]
    if not names:
        return []
    return [f"on-device training does not augment: the model's data-augmentation layers ({', '.join(names)}) pass "
            "samples through in the trainable artifact, as at inference (random image ops have no builtin kernels)"]


def _parts(loaded: Any, config: TrainableConfig) -> tuple[Any, Any, Any]:
    """(backbone to export as int8 or ``None``, the model that trains, the whole model to verify against).

    Head-only training of a Keras 3 model tf-keras cannot rebuild as a whole splits the Keras 3 model: its
    backbone converts from its own graph (any layer the converter takes), its Dense head is rebuilt alone.
    A plain SavedModel's graph is split at its trailing dense layers the same way.
    """
    from edgekit.loading.graph import export_keras3, pin_graph
    from edgekit.trainable.graph import split_head, split_head_keras3
    from edgekit.trainable.graph_head import split_head_graph

    if config.head_only and loaded.model is None and loaded.keras3_model is not None:
        backbone, head = split_head_keras3(loaded.keras3_model)
        return pin_graph(export_keras3(backbone, probabilities=False), loaded.input_shape), head, loaded.source
    if config.head_only and loaded.model is None:  # a plain SavedModel: split its graph at the dense head
        backbone, head = split_head_graph(loaded.graph)
        return backbone, head, loaded.source
    keras_model = loaded.trainable_model("on-device training")
    if config.head_only:
        backbone, head = split_head(keras_model)
        return backbone, head, keras_model
    return None, keras_model, keras_model


def _verification_data(loaded: Any, data: str | Path | Dataset | None, config: TrainableConfig) -> Dataset:
    """The user's data fitted to the model; without data, synthetic samples of the model's own input shape
    (verification compares the artifact with the Keras model, so any input of the right shape serves)."""
    if data is not None:
        return fit_to_model(load_data(data), loaded.input_shape, loaded.input_dtype, loaded.num_classes)
    if config.head_only:
        raise InputError("a head-only export calibrates its int8 backbone on real samples: give data "
                         "(an .npz with x of the model's input shape)")
    if any(d is None for d in loaded.input_shape):
        raise InputError(f"the model's input {loaded.input_shape} has a free dimension: give data to verify with")
    rng = np.random.default_rng(0)
    if not loaded.input_dtype.startswith("float"):  # token ids: within the first Embedding's vocabulary
        from edgekit.loading.layers import vocabulary

        x = rng.integers(0, vocabulary(loaded.model) or 2, (256, *loaded.input_shape)).astype(loaded.input_dtype)
    else:
        x = rng.random((256, *loaded.input_shape), dtype=np.float32)
    return Dataset(x, rng.integers(0, loaded.num_classes, 256), SYNTHETIC)


SYNTHETIC = "synthetic inputs"
"""The name of the samples an export without data verifies on."""


def _contract(loaded: Any, train_model: Any, tensors: list, softmax_out: bool,
              config: TrainableConfig) -> dict[str, Any]:
    """The ``trainable`` section of the manifest: signatures, tensors and shapes a device relies on."""

    return {
        "mode": "head-only" if config.head_only else "full", "batch_size": config.batch_size,
        "num_classes": loaded.num_classes, "learning_rate": config.learning_rate,
        "input": {"shape": [None, *loaded.input_shape],
                  "dtype": "float32" if loaded.input_dtype.startswith("float") else loaded.input_dtype},
        "head_input": {"shape": [None, *train_model.inputs[0].shape[1:]]} if config.head_only else None,
        "output": "probabilities" if softmax_out else "logits",
        "signatures": {
            "train": list(TRAIN_INPUTS), "infer": ["x"],
            "get_weights": [], "set_weights": [t.name for t in tensors]},
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in tensors],
        # personalisation: the tensors of the layers after the last Flatten / global pooling layer
        "head_tensors": [t.name for t in tensors] if config.head_only else _head_tensors(train_model),
    }


def _head_tensors(model: Any) -> list[str]:
    """Names of the trainable tensors of the model's head (after its last Flatten / global pooling layer)."""
    from edgekit.trainable.contract import tensor_key
    from edgekit.trainable.graph import build_nodes, head_layers

    head = set(head_layers(model))
    return [tensor_key(node.name, p) for node in build_nodes(model) if node.name in head for p, _ in node.params]


def _verify(files: dict[str, bytes], manifest: dict, keras_model: Any, train_model: Any, dataset: Dataset,
            config: TrainableConfig, reference_step: Any, trainer_cls: Any) -> dict[str, Any]:
    trainer = trainer_cls.from_bytes(files["trainable.tflite"], manifest, backbone=files.get("backbone.tflite"))
    x = dataset.x[: min(len(dataset), 256)]
    source = np.asarray(keras_model(x, training=False))
    got = trainer.predict(x)
    agreement = float(np.mean(got.argmax(1) == source.argmax(1)) * 100)
    infer_diff = float(np.max(np.abs(got - source)))
    if not config.head_only and infer_diff > 1e-4:
        raise VerificationError(f"trainable infer differs from the Keras model by {infer_diff:.3g} (tolerance 1e-4)",
                                max_abs_diff=infer_diff, tolerance=1e-4, artifact="trainable.tflite")
    batch = config.batch_size
    xb = np.resize(dataset.x, (batch, *dataset.x.shape[1:])).astype(trainer.input_dtype)
    yb = np.resize(dataset.y if dataset.y is not None else source.argmax(1), batch).astype(np.int32)
    if config.head_only:
        xb = trainer.features(xb)
    before = trainer.get_weights()
    trainer.train_step(xb, yb, learning_rate=config.learning_rate, dropout=0.0)  # TensorFlow's step: inference mode
    after = trainer.get_weights()
    trainer.set_weights(before)
    # the reference runs on a float copy of the head (head-only) or of the whole model
    want = reference_step(train_model, xb, yb, learning_rate=config.learning_rate)
    parity = step_parity(before, after, want)
    if not parity.ok:
        raise VerificationError(f"one train step in LiteRT differs from TensorFlow's SGD step on {parity.worst} by "
                                f"{parity.worst_relative:.3g} of the step (L2; tolerance {PARITY_RTOL:g}; max abs "
                                f"diff {parity.max_abs_diff:.3g})", max_abs_diff=parity.max_abs_diff,
                                tolerance=PARITY_RTOL, artifact="trainable.tflite")
    return {"infer_max_abs_diff": infer_diff, "infer_top1_agreement": agreement,
            "train_step_max_abs_diff": parity.max_abs_diff, "train_step_max_relative_l2": parity.worst_relative,
            "runtime": trainer.runtime}


@dataclass(frozen=True)
class StepParity:
    """One train step against TensorFlow's: the largest absolute difference, and the tensor whose difference is
    the largest share of the step (L2) among those past :data:`PARITY_TOLERANCE`."""

    max_abs_diff: float
    worst: str | None
    worst_relative: float

    @property
    def ok(self) -> bool:
        """Within the one parity rule (:data:`PARITY_TOLERANCE`, :data:`PARITY_RTOL`)."""
        return self.worst is None or self.worst_relative <= PARITY_RTOL


def step_parity(before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                want: dict[str, np.ndarray]) -> StepParity:
    """How far a step from ``before`` to ``after`` is from TensorFlow's (``want``): the rule the export checks and
    the benchmarks use.

    >>> w = {"k": np.zeros(4, np.float32)}
    >>> step_parity(w, {"k": np.full(4, 1.00002, np.float32)}, {"k": np.ones(4, np.float32)}).ok
    True
    """
    max_abs = max(float(np.max(np.abs(after[k] - want[k]))) for k in want)
    relative = {k: float(np.linalg.norm(after[k] - want[k]) / max(np.linalg.norm(want[k] - before[k]), 1e-12))
                for k in want if float(np.max(np.abs(after[k] - want[k]))) > PARITY_TOLERANCE}
    worst = max(relative, key=relative.get, default=None)
    return StepParity(max_abs, worst, relative[worst] if worst is not None else 0.0)
