"""Loading a user's Keras model, whatever the format, as one verified tf-keras model.

Accepted: SavedModel folders written by tf-keras, ``.h5`` files, tf-keras ``.keras`` files and
Keras 3 ``.keras`` (or ``.h5``) files. tensorflow-model-optimization works only on tf-keras, so a
Keras 3 model is rebuilt layer by layer as a tf-keras model with the same weights, and the
rebuild is checked numerically against the original before anything else runs.
"""

from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import first_line
from edgekit import _tf
from edgekit._io import sha256_of
from edgekit.errors import DataError, ModelLoadError, UnsupportedLayerError
from edgekit.loading import binary, task
from edgekit.loading.data import shape_text
from edgekit.loading.layers import check_model
from edgekit.loading.precision import Float32Served, float32_model, refuse_keras_quantized
from edgekit.loading.rebuild import REBUILD_TOLERANCE, rebuild_keras3

__all__ = ["REBUILD_TOLERANCE", "LoadedModel", "accuracy", "check_code_free", "copy_model", "ends_in_softmax",
           "float_pixels", "import_custom_objects", "load_model", "load_warnings", "pin_input", "predict",
           "rebuild_keras3"]


@dataclass
class LoadedModel:
    """The user's model as edgekit uses it, plus what edgekit learned about it while loading.

    ``model`` is a tf-keras model (what training-based techniques need) or ``None``; ``graph`` is the
    model's serving graph when there is no tf-keras model (a Keras 3 model tf-keras cannot rebuild, a
    plain SavedModel). :attr:`source` is whichever exists: what post-training paths convert and what
    predictions run on. ``training_unavailable`` says why pruning, QAT, distillation and on-device
    training cannot run on this model (``None`` when they can).
    """

    model: Any
    path: str
    sha256: str
    source_format: str  # "savedmodel" | "h5" | "keras" | "keras3" | "object"
    rebuild_max_abs_diff: float | None = None
    graph: Any = None
    training_unavailable: str | None = None
    keras3_model: Any = None  # the Keras 3 model behind ``graph`` when tf-keras could not rebuild it (head-only
    #                           on-device training splits it: its trailing Dense head is rebuilt on its own)
    free_input_shape: tuple[int | None, ...] | None = None  # the model's own input shape when :func:`pin_input`
    #                                                         fixed its free dimensions (``None``: nothing was free)
    float32_served: Float32Served | None = None  # a model trained with mixed precision, served in float32
    #                                             (:mod:`edgekit.loading.precision`; ``None``: it computes in 32 bits)
    one_output: binary.OneOutput | None = None  # what a binary classifier's one output was, now served as two columns
    #                                      (:mod:`edgekit.loading.binary`; ``None``: the model has a column per class)
    compile_loss: str | None = None  # the loss the model was compiled with (:func:`edgekit.loading.task.loss_name`)

    @property
    def source(self) -> Any:
        return self.model if self.model is not None else self.graph

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return tuple(self.model.inputs[0].shape[1:]) if self.model is not None else self.graph.input_shape

    @property
    def input_dtype(self) -> str:
        return self.model.inputs[0].dtype.name if self.model is not None else self.graph.input_dtype

    @property
    def num_classes(self) -> int:
        return int(self.model.outputs[0].shape[-1]) if self.model is not None else self.graph.num_classes

    @property
    def outputs_probabilities(self) -> bool:
        """True when the model ends in a softmax (outputs probabilities, not logits)."""
        return ends_in_softmax(self.model) if self.model is not None else self.graph.outputs_probabilities

    @property
    def params(self) -> int:
        return int(self.model.count_params()) if self.model is not None else self.graph.params

    def trainable_model(self, technique: str) -> Any:
        """The tf-keras model for a training-based ``technique``, or :class:`UnsupportedLayerError` saying why not."""
        if self.training_unavailable is not None:
            raise UnsupportedLayerError(f"{technique} needs a tf-keras model: {self.training_unavailable}",
                                        layer_name="?", layer_type="?")
        return self.model


PIXEL_DTYPES = ("uint8", "int8", "uint16", "int16")
"""Integer inputs that are pixels or samples (a camera's uint8 frames), not token ids, when no Embedding takes them."""


def float_pixels(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its tf-keras model taking float32 where it takes integer pixels (:data:`PIXEL_DTYPES`): its
    first layers cast them to float anyway (a ``Rescaling``), float32 holds every such value exactly, and on-device
    training differentiates in float. The twin shares nothing with the model: a clone with the same weights (and layer
    names), for on-device training; what is deployed keeps the model's own input."""
    model = loaded.model
    if model is None or loaded.input_dtype not in PIXEL_DTYPES:
        return loaded
    keras = _tf.keras()
    first = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)][:1]
    if first and first[0].__class__.__name__ == "Embedding":  # byte ids: token ids, trained through the Embedding
        return loaded
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), dtype="float32", name=model.inputs[0].name.split(":")[0])
    try:
        twin = copy_model(model, input_tensors=inputs)
    except Exception:  # noqa: BLE001 (a layer Keras cannot clone from its config: the model stays as it is, refused)
        return loaded
    return replace(loaded, model=twin)


def pin_input(loaded: LoadedModel, shape: tuple[int, ...]) -> LoadedModel:
    """``loaded`` taking samples of ``shape`` (the data's), where its input has free dimensions besides the batch
    (a fully convolutional ``(None, None, 3)``); ``loaded`` itself when it has none.

    TFLite runtimes plan every tensor's memory for one input shape: a free dimension is allocated as 1 before any
    input arrives (a convolution over a 1x1 image cannot be prepared), and int8 calibration and verification
    happen at the data's shape anyway. So the artifacts take the shape they were calibrated and verified at,
    and the batch stays free. The tf-keras model is cloned onto a fixed input with the same weights (or wrapped,
    where Keras cannot clone it); a graph is re-saved with a fixed signature.

    >>> pinned = pin_input(load_model("fcn.keras"), (96, 96, 3))   # doctest: +SKIP
    >>> pinned.input_shape, pinned.free_input_shape                # doctest: +SKIP
    ((96, 96, 3), (None, None, 3))
    """
    from edgekit.loading.graph import pin_graph

    free = loaded.input_shape
    if all(d is not None for d in free):
        return loaded
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(free) or any(d is not None and d != s for d, s in zip(free, shape)):
        raise DataError(f"samples of shape {shape} do not fit the model's input {shape_text(free)}")
    model = _pinned_keras(loaded.model, shape) if loaded.model is not None else None
    graph = pin_graph(loaded.graph, shape) if loaded.graph is not None else None
    return replace(loaded, model=model, graph=graph, free_input_shape=free)


def load_warnings(loaded: LoadedModel) -> list[str]:
    """What the user should hear about how edgekit serves the model: a mixed-precision model served in float32, a
    one-output binary classifier served as two columns, free input dimensions :func:`pin_input` fixed (nothing when
    none of these happened)."""
    served = [loaded.float32_served.note()] if loaded.float32_served is not None else []
    return served + binary.one_output_note(loaded.one_output) + _pinned_warnings(loaded)


def _pinned_warnings(loaded: LoadedModel) -> list[str]:
    if loaded.free_input_shape is None:
        return []
    return [f"the model's input {shape_text(loaded.free_input_shape)} has free dimensions: the artifacts take "
            f"{shape_text(loaded.input_shape)}, the shape of the data they were calibrated and verified on "
            "(TFLite runtimes plan memory for one shape); give data of another size for artifacts of that size"]


def _pinned_keras(model: Any, shape: tuple[int, ...]) -> Any:
    keras = _tf.keras()
    names = getattr(model, "input_names", None) or ["input"]
    given = keras.Input(shape=shape, dtype=model.inputs[0].dtype, name=str(names[0]))
    try:
        return copy_model(model, input_tensors=given)
    except Exception:  # noqa: BLE001 (a model Keras cannot clone, a subclassed one say: called whole on the input)
        return keras.Model(given, model(given), name=model.name)


def copy_model(model: Any, *, input_tensors: Any = None, clone_function: Any = None) -> Any:
    """A structural copy of a tf-keras model with its own copy of the weights (``keras.models.clone_model``: on new
    ``input_tensors``, each layer made by ``clone_function``)."""
    keras = _tf.keras()
    clone = keras.models.clone_model(model, input_tensors=input_tensors, clone_function=clone_function)
    clone.set_weights(model.get_weights())
    return clone


def predict(model: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Model outputs as float32, batched, without Keras ``predict``'s per-call overhead."""
    outs = [np.asarray(model(x[i:i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(np.mean(outputs.argmax(axis=1) == y) * 100.0)


def load_model(source: Any, *, sample: np.ndarray | None = None) -> LoadedModel:
    """Load a Keras model from a path (or take a model object) as a checked tf-keras model.

    ``sample`` (a few of the user's inputs) verifies a Keras 3 rebuild where it fits the model's input (random
    inputs otherwise: too short for a text model's strided convolutions over a free length, or far from what an
    untrained network was built for).

    >>> loaded = load_model("model.keras")          # doctest: +SKIP
    >>> loaded.source_format, loaded.num_classes    # doctest: +SKIP
    ('keras3', 10)
    """
    if not isinstance(source, (str, Path)):
        return _from_object(source, sample)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist; give a SavedModel folder, a .h5 or a .keras file")
    if path.is_dir():
        loaded = _load_savedmodel(path)
    elif path.suffix in (".h5", ".hdf5"):
        loaded = _load_h5(path, sample)
    elif path.suffix == ".keras":
        loaded = _load_keras_zip(path, sample)
    else:
        raise ModelLoadError(
            f"model {path} has an unknown extension '{path.suffix}'; "
            "give a SavedModel folder, a .h5 file or a .keras file"
        )
    if loaded.model is not None:
        _check_outputs(loaded.model)
    return _served(loaded, sample)


def _from_object(model: Any, sample: np.ndarray | None) -> LoadedModel:
    keras2 = _tf.keras()
    if isinstance(model, keras2.Model):
        _check_outputs(model)
        loaded = LoadedModel(model, "<in-memory>", "", "object", training_unavailable=_training_check(model),
                             compile_loss=task.loss_name(getattr(model, "loss", None)))
        return _served(loaded, sample)
    keras3 = sys.modules.get("keras")  # a Keras 3 model object means Keras 3 is imported (a user's subclass too)
    if keras3 is not None and isinstance(model, getattr(keras3, "Model", ())):
        loaded = _keras3_loaded(model, sample, "<in-memory>", "")
        return _served(replace(loaded, compile_loss=task.loss_name(getattr(model, "loss", None))), sample)
    raise ModelLoadError(f"expected a Keras model or a path, got {type(model).__name__}")


def _served(loaded: LoadedModel, sample: np.ndarray | None) -> LoadedModel:
    """``loaded`` as edgekit serves it: a tf-keras model computing in 16 bits in float32
    (:mod:`edgekit.loading.precision`; a Keras 3 one was before its rebuild), one output as two columns."""
    if loaded.model is not None and loaded.float32_served is None:
        model, served = float32_model(loaded.model, sample)
        loaded = replace(loaded, model=model, float32_served=served)
    loaded = _two_columns(loaded, sample)
    linear = loaded.one_output is binary.OneOutput.LOGIT or (loaded.one_output is None
                                                             and not loaded.outputs_probabilities)
    task.refuse_regression(loaded.compile_loss, linear_output=linear, source=Path(loaded.path).name)
    return loaded


def _two_columns(loaded: LoadedModel, sample: np.ndarray | None) -> LoadedModel:
    """``loaded`` itself, or a one-output binary classifier served as two columns (:mod:`edgekit.loading.binary`):
    its tf-keras model, its Keras 3 model (head-only on-device training splits it) and its graph."""
    if loaded.num_classes != 1:
        return loaded
    model, kind = binary.two_columns_keras(loaded.model, _tf.keras()) if loaded.model is not None else (None, None)
    keras3_model = None
    if loaded.keras3_model is not None and binary.dense_head(loaded.keras3_model) is not None:  # else the graph alone
        keras3_model, kind = binary.two_columns_keras(loaded.keras3_model, _tf.keras3())    # serves post-training paths
    graph = None
    if loaded.graph is not None:
        graph = binary.two_columns_graph(loaded.graph, kind or binary.graph_kind(loaded.graph, sample))
        kind = kind or (binary.OneOutput.PROBABILITY if graph.outputs_probabilities else binary.OneOutput.LOGIT)
    return replace(loaded, model=model, graph=graph, keras3_model=keras3_model, one_output=kind)


def _training_check(model: Any) -> str | None:
    """Why training-based techniques cannot run on this tf-keras model (a layer edgekit's registry lacks)."""
    try:
        check_model(model)
    except UnsupportedLayerError as exc:
        return str(exc)
    return None


def _keras3_loaded(k3: Any, sample: np.ndarray | None, path: str, digest: str) -> LoadedModel:
    """A Keras 3 model: rebuilt as tf-keras when it can be (training-based techniques need it); else
    exported to its TensorFlow graph, which every post-training path takes."""
    from edgekit.loading.graph import export_keras3

    if getattr(k3, "inputs", None) is None:  # subclassed: no layer graph to rebuild; model.export traces its call()
        _call_once(k3, sample)
        return LoadedModel(None, path, digest, "keras3", graph=export_keras3(k3, probabilities=None),
                           training_unavailable=_subclassed(k3))
    _check_outputs(k3)  # the Keras 3 model's own inputs and outputs, before a rebuild or an export needs them
    refuse_keras_quantized(k3)
    k3, served = float32_model(k3, sample)  # mixed precision: rebuilt and exported in float32
    try:
        model, diff = rebuild_keras3(k3, sample)
        _check_outputs(model)
        return LoadedModel(model, path, digest, "keras3", rebuild_max_abs_diff=diff,
                           training_unavailable=_training_check(model), float32_served=served)
    except ModelLoadError as exc:
        reason = str(exc)
    graph = export_keras3(k3, probabilities=ends_in_softmax(k3))
    return LoadedModel(None, path, digest, "keras3", graph=graph, training_unavailable=reason, keras3_model=k3,
                       float32_served=served)


def _load_savedmodel(path: Path) -> LoadedModel:
    if not (path / "saved_model.pb").is_file():
        raise ModelLoadError(f"{path} is a folder without saved_model.pb; give a SavedModel folder or a model file")
    if not (path / "keras_metadata.pb").is_file():  # Keras 3 model.export(), tf.saved_model.save: a graph only
        from edgekit.loading.graph import load_graph

        graph = load_graph(path)
        return LoadedModel(None, str(path), sha256_of(path), "savedmodel", graph=graph,
                           training_unavailable="a SavedModel without Keras layers (written by model.export() or "
                                                "tf.saved_model.save) holds a graph only")
    configs = _savedmodel_configs(path / "keras_metadata.pb")
    for config in configs:
        check_code_free(config, source=path)
    model = _tf_keras_load(path, configs, safe_mode=False)
    loss = task.loss_name(_training_loss(configs[0].get("training_config") if configs else None))
    if getattr(model, "inputs", None) is None:  # a subclassed model: tf-keras saved its functions, no layer graph
        from edgekit.loading.graph import load_graph

        return LoadedModel(None, str(path), sha256_of(path), "savedmodel", graph=load_graph(path),
                           training_unavailable=_subclassed(model), compile_loss=loss)
    return LoadedModel(model, str(path), sha256_of(path), "savedmodel", training_unavailable=_training_check(model),
                       compile_loss=loss)


def _savedmodel_configs(metadata_path: Path) -> list[Any]:
    """Every node's JSON metadata of a tf-keras SavedModel, parsed without deserializing any layer."""
    from device_agents.files import UnsafeFileError, read_bounded

    _tf.tf()  # tf-keras' protobuf module needs TensorFlow imported the edgekit way
    from tf_keras.protobuf import saved_metadata_pb2

    try:
        raw = read_bounded(metadata_path, max_bytes=MAX_CONFIG_BYTES, what="Keras metadata file")
        metadata = saved_metadata_pb2.SavedMetadata()
        metadata.ParseFromString(raw)
        return [json.loads(node.metadata) for node in metadata.nodes]
    except (UnsafeFileError, ValueError) as exc:
        raise ModelLoadError(f"{metadata_path} cannot be checked before it is deserialized "
                             f"({first_line(exc, limit=160)}); refusing the model") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(f"{metadata_path} is not valid Keras metadata ({first_line(exc, limit=160)}); "
                             "refusing the model") from None


def _load_h5(path: Path, sample: np.ndarray | None) -> LoadedModel:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            version = _attr_text(handle.attrs.get("keras_version", ""))
            config = _attr_text(handle.attrs.get("model_config", ""))
            training = _attr_text(handle.attrs.get("training_config", ""))
    except OSError:
        raise ModelLoadError(f"{path} is not a valid HDF5 file (corrupt or truncated); re-save the model") from None
    if not config:
        raise ModelLoadError(f"{path} holds weights only (no model config); save the whole model with model.save()")
    parsed = _parse_json(config, path, "model_config")
    check_code_free(parsed, source=path)
    _check_registered(parsed, keras3=version.startswith("3."), source=path)
    loaded = _load_checked(path, sample, keras3=version.startswith("3."), fmt="h5", config=parsed)
    return replace(loaded, compile_loss=task.loss_name(_training_loss(_json_or_none(training))))


def _load_keras_zip(path: Path, sample: np.ndarray | None) -> LoadedModel:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a valid .keras file (not a zip archive: corrupt or truncated); re-save it")
    try:
        with zipfile.ZipFile(path) as archive:
            texts = {}
            for name in ("metadata.json", "config.json"):
                info = archive.getinfo(name)
                if info.file_size > MAX_CONFIG_BYTES:  # checked before it is inflated
                    raise ModelLoadError(f"{path}: {name} unpacks to {info.file_size:,} bytes (limit "
                                         f"{MAX_CONFIG_BYTES:,}); refusing the model")
                texts[name] = archive.read(info)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{path} is not a valid .keras file ({exc}); re-save it with model.save()") from None
    metadata = _parse_json(texts["metadata.json"], path, "metadata.json")
    config = _parse_json(texts["config.json"], path, "config.json")
    check_code_free(config, source=path)
    keras3 = str(metadata.get("keras_version", "")).startswith("3.")
    _check_registered(config, keras3=keras3, source=path)
    loaded = _load_checked(path, sample, keras3=keras3, fmt="keras", config=config)
    return replace(loaded, compile_loss=task.loss_name(_training_loss(config.get("compile_config"))))


def _json_or_none(text: str) -> Any:
    """``text`` parsed, or ``None`` when it is empty or not JSON (an unreadable training config says nothing)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _training_loss(compiled: Any) -> Any:
    """The loss of a saved compile configuration (a .keras ``compile_config``, an .h5 or SavedModel
    ``training_config``), as saved; ``None`` when the model was saved uncompiled."""
    return compiled.get("loss") if isinstance(compiled, dict) else None


def _parse_json(text: str | bytes, path: Path, what: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a valid model file ({what}: {first_line(exc, limit=120)}); "
                             "re-save it with model.save()") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a valid model file ({what} is not an object); re-save it")
    return value


MAX_CONFIG_BYTES = 64 * 1024**2
"""The largest model configuration (config.json, an .h5 model_config, keras_metadata.pb) parsed."""
CODE_CLASSES = frozenset({"Lambda", "__lambda__", "TFOpLambda", "SlicingOpLambda"})
"""Serialized objects that carry or call Python code when deserialized."""


def check_code_free(config: Any, *, source: Path) -> None:
    """Refuse a saved model configuration that would run Python code when deserialized (a ``Lambda``
    layer's bytecode, a serialized function), wherever it sits: every node, dict or list form,
    nested models, wrapper layers. Runs before any loader sees the file.
    """
    for node in _config_nodes(config):
        class_name = node.get("class_name")
        if class_name in CODE_CLASSES:
            inner = node.get("config") if isinstance(node.get("config"), dict) else node
            raise ModelLoadError(
                f"{source}: layer '{inner.get('name', '?')}' is a {class_name}, whose Python code would run when "
                "the model loads; edgekit refuses models that carry code (rebuild it with standard layers)")
        if "function_type" in node or "output_shape_type" in node:
            raise ModelLoadError(f"{source}: layer '{node.get('name', '?')}' holds a serialized Python function, "
                                 "which would run when the model loads; edgekit refuses models that carry code")


def _config_nodes(config: Any) -> Any:
    """Every dict inside a parsed model configuration, at any depth (iteratively: no recursion limit)."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(node.values())


def _check_registered(config: Any, *, keras3: bool, source: Path) -> None:
    """Refuse, naming it, a custom class (``package>Name``) of the config that no imported module registered."""
    keras = _tf.keras3() if keras3 else _tf.keras()
    for node in _config_nodes(config):
        registered = node.get("registered_name")
        if isinstance(registered, str) and ">" in registered and keras.saving.get_registered_object(registered) is None:
            name = node.get("config", {}).get("name", "?") if isinstance(node.get("config"), dict) else "?"
            raise ModelLoadError(f"{source}: layer '{name}' is the custom class '{registered}', which no imported "
                                 "module registers; import the module that registers it first (custom objects)")


def _load_checked(path: Path, sample: np.ndarray | None, *, keras3: bool, fmt: str, config: Any) -> LoadedModel:
    """Load a file whose ``config`` was checked: Keras 3 files are rebuilt as tf-keras (or used as their
    graph), tf-keras files load directly (any layer tf-keras has; training needs registered layers)."""
    if keras3:
        k3 = _guarded_load(lambda: _tf.keras3().saving.load_model(path, compile=False, safe_mode=True), path)
        return _keras3_loaded(k3, sample, str(path), sha256_of(path))
    model = _tf_keras_load(path, [config], safe_mode=True)
    return LoadedModel(model, str(path), sha256_of(path), fmt, training_unavailable=_training_check(model))


TFMOT_PRUNING = frozenset({"PruneLowMagnitude"})
TFMOT_QAT = frozenset({"QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2", "QuantizeAnnotate"})
"""tensorflow-model-optimization's wrapper layers, as a model saved mid-way through pruning or QAT holds them."""


def _tf_keras_load(path: Path, configs: list[Any], *, safe_mode: bool) -> Any:
    """The tf-keras model at ``path`` (``configs``: its checked configs). A model saved while tfmot pruned it
    (``PruneLowMagnitude`` wrappers: "Unknown layer" to a plain loader) loads under tfmot's scope and is stripped,
    its sparse weights kept; a QAT model is refused (edgekit quantizes from the float model)."""
    names = {node.get("class_name") for config in configs for node in _config_nodes(config)}
    qat = sorted(names & TFMOT_QAT)
    if qat:
        raise ModelLoadError(f"{path} is a quantization-aware-training model (tensorflow-model-optimization's "
                             f"{', '.join(qat)} layers); give edgekit the float model: it runs QAT itself (the qat "
                             "recipe) and converts for TFLite and ONNX runtimes")
    kwargs = {"compile": False, **({"safe_mode": True} if safe_mode else {})}
    if not names & TFMOT_PRUNING:
        return _guarded_load(lambda: _tf.keras().models.load_model(path, **kwargs), path)
    sparsity = _tf.tfmot().sparsity.keras
    with sparsity.prune_scope():
        wrapped = _guarded_load(lambda: _tf.keras().models.load_model(path, **kwargs), path)
    return sparsity.strip_pruning(wrapped)


def _attr_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def import_custom_objects(module: str) -> None:
    """Import the module that registers a model's custom layers (``@keras.saving.register_keras_serializable``)
    so that models using them load. Importing runs that module's code: name only modules you trust.
    Everything else keeps loading in safe mode (no Lambda or serialized function is ever deserialized).

    >>> import_custom_objects("my_project.layers")   # doctest: +SKIP
    """
    import importlib
    import sys

    _tf.tf()  # TensorFlow first, the edgekit way: the module may import keras or tensorflow itself
    added = "" not in sys.path and str(Path.cwd()) not in sys.path
    if added:  # a module of the current folder, as `python -m` would find it
        sys.path.insert(0, str(Path.cwd()))
    try:
        importlib.import_module(module)
    except Exception as exc:
        raise ModelLoadError(f"cannot import the custom-objects module '{module}': {first_line(exc)}; "
                             "give an importable module path (e.g. my_project.layers)") from None
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))


_UNKNOWN_CLASS = ("Could not locate class", "Unknown layer", "Could not deserialize class", "Unknown object")


def _guarded_load(load, path: Path):  # noqa: ANN001, ANN202
    from edgekit.loading.rebuild import register_activations

    register_activations()  # a model edgekit rebuilt from Keras 3 may use its activations
    try:
        return load()
    except UnsupportedLayerError:
        raise
    except Exception as exc:  # the loaders raise many types for corrupt files
        hint = ("; if it is a custom layer, import the module that registers it first (custom objects)"
                if any(marker in str(exc) for marker in _UNKNOWN_CLASS) else "")
        raise ModelLoadError(f"cannot load model {path}: {first_line(exc, limit=200)}{hint}") from None


def _call_once(model: Any, sample: np.ndarray | None) -> None:
    """Call a subclassed Keras 3 model loaded from a file once, as ``model.export`` requires: loading builds it (its
    weights in place, its input shape recorded from the build) but does not call it. The call takes one of the user's
    samples where it fits the recorded shape, else zeros of that shape (a free dimension as 1)."""
    if getattr(model, "_called", True):
        return
    shapes = list((getattr(model, "_build_shapes_dict", None) or {}).values())
    if len(shapes) != 1 or not isinstance(shapes[0], (list, tuple)) or len(shapes[0]) < 2:
        raise ModelLoadError(f"the subclassed {type(model).__name__} has no one recorded input shape (recorded: "
                             f"{shapes or 'none'}: never built or called); call it once on a batch before saving it, "
                             "or save it as a SavedModel (model.export(path)) and give that folder")
    shape = tuple(shapes[0])[1:]
    fits = sample is not None and sample.ndim == len(shape) + 1 and all(
        want is None or want == have for want, have in zip(shape, sample.shape[1:], strict=True))
    x = sample[:1] if fits else np.zeros((1, *(1 if d is None else d for d in shape)))
    try:
        model(x.astype(model.input_dtype))
    except Exception as exc:
        raise ModelLoadError(f"calling the subclassed {type(model).__name__} on an input of shape {x.shape} failed: "
                             f"{first_line(exc, limit=200)}") from None


def _subclassed(model: Any) -> str:
    """Why training-based techniques cannot run on a subclassed model (used by its graph)."""
    return f"a subclassed model ({type(model).__name__}) has no layer graph for training-based techniques to rewrite"


def _check_outputs(model: Any) -> None:
    if getattr(model, "inputs", None) is None or getattr(model, "outputs", None) is None:
        raise ModelLoadError(f"the model is a subclassed {type(model).__name__} with no layer graph (no inputs and "
                             "outputs to check); save it as a SavedModel (model.export(path) in Keras 3, "
                             "tf.saved_model.save in tf-keras) and give that folder")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        ins, outs = len(model.inputs), len(model.outputs)
        raise ModelLoadError(
            f"the model has {ins} input{'s' * (ins != 1)} and {outs} output{'s' * (outs != 1)}; "
            "edgekit handles single-input, single-output classifiers"
        )
    task.refuse_text_input(_dtype_name(model.inputs[0].dtype))
    shape = model.outputs[0].shape
    if len(shape) != 2 or shape[-1] is None:
        raise ModelLoadError(
            f"the model's output has shape {tuple(shape)}; edgekit handles classifiers with output "
            "(batch, classes), or (batch, 1) for a binary classifier"
        )
    if shape[-1] > 1 and _last_activation(model) == "sigmoid":
        inputs = tuple(model.inputs[0].shape[1:])
        echo = None not in inputs and int(np.prod(inputs)) == shape[-1]
        what = f"{shape[-1]} outputs for {shape[-1]} input values: an autoencoder?" if echo else \
            "a multi-label classifier?"
        raise ModelLoadError(
            f"the model ends in {shape[-1]} sigmoids, an independent 0-1 value per unit ({what}); edgekit handles "
            "single-label classifiers, whose top-1 class it verifies: a softmax or logits over the classes, or one "
            "sigmoid for a binary classifier"
        )


def _dtype_name(dtype: Any) -> str:
    """A Keras tensor's dtype as a name: Keras 3 gives a string, tf-keras a ``tf.DType``."""
    return dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))


def ends_in_softmax(model: Any) -> bool:
    """True when the model's last layer is a softmax (it outputs probabilities, not logits)."""
    return _last_activation(model) == "softmax"


def _last_activation(model: Any) -> str:
    """The name of the activation that makes the model's output (``"softmax"`` for a ``Softmax`` layer or a Keras 3
    ``ops.softmax`` node, ``""`` for a layer without one)."""
    layer = _output_layer(model)
    named = {"Softmax": "softmax", "Sigmoid": "sigmoid"}.get(layer.__class__.__name__)  # a layer, or an op node
    return named or getattr(getattr(layer, "activation", None), "__name__", "")


def _output_layer(model: Any) -> Any:
    """The layer (or Keras 3 op node) that makes the model's output, inside a nested model at the end too."""
    outputs = getattr(model, "outputs", None)
    history = getattr(outputs[0], "_keras_history", None) if outputs else None
    layer = history[0] if history else model.layers[-1]
    return _output_layer(layer) if hasattr(layer, "layers") and layer.layers else layer
