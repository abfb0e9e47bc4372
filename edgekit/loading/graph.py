"""A model known by its serving graph only: a SavedModel folder with a ``serving_default`` signature.

Post-training paths (float32, float16, dynamic and int8 export, verification) need nothing more than
the model's graph: the TFLite converter reads the SavedModel, tf2onnx the signature's function. So a
Keras 3 model that cannot be rebuilt as tf-keras (any layer tf-keras lacks: MultiHeadAttention with
Keras 3 options, preprocessing, custom-free architectures of keras.applications...) is exported to a
SavedModel (Keras 3's own ``model.export``), and a plain SavedModel (``model.export()``,
``tf.saved_model.save``) is used as it is. Only training-based techniques need tf-keras.

Graphs are code too: before a SavedModel's function is called, its op list is checked and graphs with
file-system or Python-callback ops are refused (:data:`FORBIDDEN_OPS`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import _tf
from edgekit._io import temp_dir
from edgekit.errors import ModelLoadError
from edgekit.loading.task import refuse_text_input

FORBIDDEN_OPS = frozenset({
    "WriteFile", "ReadFile", "DeleteFile", "MatchingFiles", "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "CreateSummaryFileWriter", "WriteSummary", "WriteScalarSummary", "WriteRawProtoSummary",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "RecursiveCreateDir", "ShellExecute",
})
"""Ops a classifier's serving graph has no business running: file I/O, Python callbacks, summaries."""
SIGNATURE = "serving_default"


@dataclass
class SavedModelGraph:
    """The serving signature of a SavedModel, callable like a model: ``graph(x) -> outputs``."""

    path: Path
    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: str
    num_classes: int
    params: int
    function: Any = field(repr=False)
    owner: Any = field(repr=False)  # the loaded object: keeps the function's variables alive
    outputs_probabilities: bool = False
    temporary: bool = False  # exported by edgekit into a temporary folder (removed with the graph)
    layer_names: tuple[str, ...] = ()  # the Keras layers it was exported from (to name a layer in errors)
    # a binary classifier's one-output graph this graph appends a second column to (:mod:`edgekit.loading.binary`):
    # head-only training splits that one at its dense head
    one_column: SavedModelGraph | None = field(default=None, repr=False)

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        tf = _tf.tf()
        out = self.function(**{self.input_name: tf.constant(np.asarray(x), dtype=self.input_dtype)})
        return next(iter(out.values())).numpy()

    def __del__(self) -> None:
        if self.temporary:  # edgekit's own export: a folder of its own under the temporary directory
            shutil.rmtree(self.path.parent, ignore_errors=True)


def check_graph_ops(path: Path) -> None:
    """Refuse a SavedModel whose graph (or any function in its library) holds a forbidden op."""
    _tf.tf()  # first: importing tensorflow.core imports TensorFlow itself, which must see tf-keras chosen
    from tensorflow.core.protobuf import saved_model_pb2

    from device_agents.files import UnsafeFileError, read_bounded
    try:
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString(read_bounded(path / "saved_model.pb", max_bytes=1024**3, what="saved_model.pb"))
    except (UnsafeFileError, ValueError) as exc:
        raise ModelLoadError(f"{path}/saved_model.pb cannot be checked before it is loaded ({exc})") from None
    except Exception as exc:  # protobuf's DecodeError
        raise ModelLoadError(f"{path}/saved_model.pb is not a valid SavedModel ({type(exc).__name__})") from None
    for meta in proto.meta_graphs:
        nodes = list(meta.graph_def.node)
        for function in meta.graph_def.library.function:
            nodes.extend(function.node_def)
        bad = sorted({node.op for node in nodes} & FORBIDDEN_OPS)
        if bad:
            raise ModelLoadError(f"{path}: the graph runs {', '.join(bad)} (file system or Python code); edgekit "
                                 "refuses models that carry code")


def load_graph(path: Path, *, temporary: bool = False, params: int | None = None,
               probabilities: bool | None = None) -> SavedModelGraph:
    """Load ``path``'s serving signature (checked first) as a :class:`SavedModelGraph` of one classifier."""
    check_graph_ops(path)
    tf = _tf.tf()
    try:
        owner = tf.saved_model.load(str(path))
        function = owner.signatures[SIGNATURE]
    except KeyError:
        raise ModelLoadError(f"{path} has no '{SIGNATURE}' signature; export the model with model.export() or "
                             "tf.saved_model.save(model, path, signatures=...)") from None
    except Exception as exc:
        from device_agents.errors import first_line

        raise ModelLoadError(f"cannot load SavedModel {path}: {first_line(exc)}") from None
    inputs = function.structured_input_signature[1]
    outputs = function.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{path}: the serving signature has {len(inputs)} inputs and {len(outputs)} outputs; "
                             "edgekit handles single-input, single-output classifiers")
    name, spec = next(iter(inputs.items()))
    refuse_text_input(spec.dtype.name, source=str(path))
    if spec.shape.rank and spec.shape[0] is not None:  # exported for one batch size (PyTorch/ONNX conversions often)
        free = ", ".join(["None", *("None" if d is None else str(d) for d in spec.shape[1:])])
        raise ModelLoadError(f"{path}: the serving signature takes a fixed batch of {spec.shape[0]} (input "
                             f"{tuple(spec.shape)}); edgekit calibrates, verifies and serves batches of any size: "
                             f"export the model with a free batch dimension (tf.TensorSpec([{free}]))")
    out_shape = next(iter(outputs.values())).shape
    if len(out_shape) != 2 or out_shape[-1] is None:
        raise ModelLoadError(f"{path}: the serving output has shape {tuple(out_shape)}; edgekit handles classifiers "
                             "with output (batch, classes), or one output for a binary classifier")
    if params is None:
        params = int(sum(np.prod(v.shape) for v in getattr(owner, "variables", [])))
    graph = SavedModelGraph(path, name, tuple(spec.shape[1:]), spec.dtype.name, int(out_shape[-1]), params,
                            function, owner, temporary=temporary)
    graph.outputs_probabilities = _looks_like_probabilities(graph) if probabilities is None else probabilities
    return graph


def export_keras3(model: Any, *, probabilities: bool | None) -> SavedModelGraph:
    """Export a Keras 3 model with its own ``model.export`` into a temporary SavedModel and load it
    (``probabilities``: whether it outputs probabilities; ``None``: judged from its outputs)."""
    folder = temp_dir("graph") / "saved_model"
    try:
        _without_augmentation(model).export(str(folder), format="tf_saved_model", verbose=False)
    except Exception as exc:
        from device_agents.errors import first_line

        shutil.rmtree(folder.parent, ignore_errors=True)
        raise ModelLoadError(f"the Keras 3 model cannot be exported as a TensorFlow graph: {first_line(exc)}") from None
    graph = load_graph(folder, temporary=True, params=int(model.count_params()), probabilities=probabilities)
    graph.layer_names = tuple(layer.name for layer in model._flatten_layers(include_self=False))  # noqa: SLF001
    return graph


def _without_augmentation(model: Any) -> Any:
    """``model`` sharing its layers, its data-augmentation layers (:data:`~edgekit.loading.layers.AUGMENTATION_LAYERS`,
    the identity at inference) replaced by ``Identity``; ``model`` itself when it has none, or is subclassed."""
    from edgekit.loading.layers import AUGMENTATION_LAYERS, iter_layers

    if getattr(model, "inputs", None) is None or not any(
            type(layer).__name__ in AUGMENTATION_LAYERS for layer in iter_layers(model)):
        return model
    keras = _tf.keras3()

    def same_or_identity(layer: Any) -> Any:
        if type(layer).__name__ in AUGMENTATION_LAYERS:
            return keras.layers.Identity(name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=same_or_identity, recursive=True)


def pin_graph(graph: SavedModelGraph, shape: tuple[int, ...]) -> SavedModelGraph:
    """``graph`` with its input's free dimensions fixed to ``shape`` (the sample shape; the batch stays free),
    re-saved as a SavedModel of its own under the temporary directory; ``graph`` itself when nothing is free.

    The converters keep a free dimension free: the TFLite interpreter then allocates it as 1 before any input
    arrives, and a convolution over a 1x1 image cannot be prepared (XNNPACK: "failed to reshape runtime")."""
    if all(d is not None for d in graph.input_shape):
        return graph
    tf = _tf.tf()
    spec = tf.TensorSpec([None, *shape], graph.input_dtype, name=graph.input_name)
    pinned = resaved(graph, spec, None, probabilities=graph.outputs_probabilities,
                     what=f"the model's graph cannot take inputs of shape {tuple(shape)}")
    pinned.layer_names = graph.layer_names
    if graph.one_column is not None:
        pinned.one_column = pin_graph(graph.one_column, shape)
    return pinned


def resaved(graph: SavedModelGraph, spec: Any, transform: Any, *, probabilities: bool, what: str) -> SavedModelGraph:
    """``graph``'s signature traced for inputs of ``spec`` with ``transform`` (``None``: the identity) applied to its
    output, re-saved as a SavedModel of its own under the temporary directory and loaded (checked) from there;
    ``what`` starts the error when TensorFlow cannot trace or save it."""
    tf = _tf.tf()

    def serve(x: Any) -> Any:
        outputs = graph.function(**{graph.input_name: x})
        return outputs if transform is None else {key: transform(value) for key, value in outputs.items()}

    function = tf.function(serve).get_concrete_function(spec)
    module = tf.Module()
    module.owner = graph.owner  # tracks every variable and resource the signature captures
    folder = temp_dir("graph") / "saved_model"
    try:
        tf.saved_model.save(module, str(folder), signatures={SIGNATURE: function})
        return load_graph(folder, temporary=True, params=graph.params, probabilities=probabilities)
    except ModelLoadError:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    except Exception as exc:
        from device_agents.errors import first_line

        shutil.rmtree(folder.parent, ignore_errors=True)
        raise ModelLoadError(f"{what}: {first_line(exc)}") from None


def random_inputs(graph: SavedModelGraph, count: int = 4) -> np.ndarray:
    """``count`` random inputs for ``graph`` (0/1 ids for an integer input, [0, 1) floats otherwise; a free
    dimension taken as 8), seeded."""
    rng = np.random.default_rng(0)
    shape = [count, *(d or 8 for d in graph.input_shape)]
    x = rng.integers(0, 2, shape) if np.issubdtype(np.dtype(graph.input_dtype), np.integer) else rng.random(shape)
    return x.astype(graph.input_dtype)


def _looks_like_probabilities(graph: SavedModelGraph) -> bool:
    """Whether the outputs on random inputs are rows of probabilities (non-negative, summing to 1)."""
    out = graph(random_inputs(graph))
    return bool((out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
