"""Keras 3 -> tf-keras: a generic, numerically checked rebuild of a Keras 3 model.

tensorflow-model-optimization (pruning, QAT) and edgekit's own training paths work on tf-keras, so a
Keras 3 model is rebuilt as tf-keras with the same weights. The rebuild is generic: any layer class
that tf-keras also has is built from the Keras 3 config (keys the tf-keras constructor lacks dropped,
initializers dropped because the weights are copied), nested models are rebuilt recursively, shared
layers are called once per node in dependency order, and the Keras 3 activations tf-keras lacks (or
defines differently, like ``hard_sigmoid``) are provided here. Whatever cannot be rebuilt, or differs
from the original by more than :data:`REBUILD_TOLERANCE` on real inputs (beyond the model's own float32 rounding,
:func:`_judge_by_layers`), raises :class:`~edgekit.errors.ModelLoadError`; the caller then uses the model's own
TensorFlow graph.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from device_agents.errors import first_line
from edgekit import _tf
from edgekit.errors import ModelLoadError
from edgekit.loading.layers import iter_layers, vocabulary

REBUILD_TOLERANCE = 1e-5
LAYER_TOLERANCE = 1e-5
"""A rebuilt layer's largest difference from its Keras 3 layer on the same inputs, relative to its output's
largest magnitude (float32 rounding is about 1e-7 of it)."""
AMPLIFIED_TOLERANCE = 1e-3
"""The model's outputs may differ by this much when every layer agrees and no prediction changes: the model's own
amplification of float32 rounding, not a wrong layer."""
_BASE_LAYER_KWARGS = {"name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_size",
                      "weights", "activity_regularizer", "autocast", "input_dim", "input_length"}
_MODEL_CLASSES = ("Functional", "Sequential", "Model")
_EXTRA_CONFIG = {"MultiHeadAttention": {"query_shape": None, "key_shape": None, "value_shape": None}}
"""Config keys a tf-keras layer's ``from_config`` requires although its constructor does not take them."""


def _activations() -> dict[str, Any]:
    """Keras 3 activations by name, as tf-keras functions (those tf-keras lacks or defines differently) or as the
    name of the tf-keras builtin that equals them (``silu`` is tf-keras's ``swish``, which tfmot also knows)."""
    tf = _tf.tf()

    def edgekit_hard_sigmoid(x: Any) -> Any:  # Keras 3: relu6(x + 3) / 6 (tf-keras: clip(0.2x + 0.5))
        return tf.nn.relu6(x + 3.0) / 6.0

    def edgekit_hard_silu(x: Any) -> Any:
        return x * tf.nn.relu6(x + 3.0) / 6.0

    def edgekit_silu(x: Any) -> Any:
        return x * tf.sigmoid(x)

    def edgekit_relu6(x: Any) -> Any:
        return tf.nn.relu6(x)

    def edgekit_leaky_relu(x: Any) -> Any:  # Keras 3's default negative slope
        return tf.nn.leaky_relu(x, alpha=0.2)

    def edgekit_log_softmax(x: Any) -> Any:
        return tf.nn.log_softmax(x)

    def edgekit_hard_tanh(x: Any) -> Any:
        return tf.clip_by_value(x, -1.0, 1.0)

    def edgekit_log_sigmoid(x: Any) -> Any:
        return tf.math.log_sigmoid(x)

    def edgekit_gelu(x: Any) -> Any:  # exact gelu through erf: TFLite's GELU builtin and ONNX's Erf (tf.nn.gelu
        return 0.5 * x * (1.0 + tf.math.erf(x * 0.7071067811865476))  # emits Erfc, which ONNX lacks)

    return {"hard_sigmoid": edgekit_hard_sigmoid, "hard_silu": edgekit_hard_silu, "hard_swish": edgekit_hard_silu,
            "silu": "swish", "edgekit_silu": edgekit_silu, "relu6": edgekit_relu6, "leaky_relu": edgekit_leaky_relu,
            "log_softmax": edgekit_log_softmax, "hard_tanh": edgekit_hard_tanh, "log_sigmoid": edgekit_log_sigmoid,
            "gelu": edgekit_gelu}


def register_activations() -> dict[str, str]:
    """Make edgekit's Keras 3 activations known to tf-keras (so a rebuilt model saves and loads again);
    return Keras 3 name -> tf-keras name."""
    keras = _tf.keras()
    custom = keras.utils.get_custom_objects()
    names = {}
    for k3_name, fn in _activations().items():
        if isinstance(fn, str):
            names[k3_name] = fn
            continue
        custom.setdefault(fn.__name__, fn)
        names[k3_name] = fn.__name__
    return names


def rebuild_keras3(k3_model: Any, sample: np.ndarray | None = None) -> tuple[Any, float]:
    """Rebuild a Keras 3 model as an equal tf-keras model; return it and the max abs output diff.

    Raises :class:`ModelLoadError` naming the layer that cannot be rebuilt, or the difference when the
    outputs differ by more than ``REBUILD_TOLERANCE``.

    >>> model, diff = rebuild_keras3(keras.applications.MobileNetV2(weights=None))  # doctest: +SKIP
    """
    builder = _Builder(register_activations())
    try:
        model = builder.model(k3_model.__class__.__name__, k3_model.get_config())
        _copy_weights(k3_model, model)
    except ModelLoadError:
        raise
    except Exception as exc:
        where = f" at layer '{builder.current}'" if builder.current else ""
        raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras{where}: {first_line(exc)}") from None
    x = _fitting(sample, model)
    x = (x if x is not None else _random_inputs(model))[:64]
    want = np.asarray(k3_model(x, training=False))
    got = model(x, training=False).numpy()
    diff = float(np.max(np.abs(want - got))) if want.size else 0.0
    if not diff <= REBUILD_TOLERANCE:
        _judge_by_layers(k3_model, model, x, diff, same_top1=bool(np.all(want.argmax(-1) == got.argmax(-1))))
    return model, diff


def _judge_by_layers(k3_model: Any, model: Any, x: np.ndarray, diff: float, *, same_top1: bool) -> None:
    """The outputs differ by more than :data:`REBUILD_TOLERANCE`: a wrong layer, or float32 rounding the model
    itself amplifies (a trained MobileNetV3Small fed 0-1 pixels: 2.6e-05, from BatchNormalization over the
    near-constant outputs its own ``Rescaling`` makes). Each layer of the rebuild is run on the Keras 3 layer's own
    inputs: one that differs by more than :data:`LAYER_TOLERANCE` of its output is named; when every layer agrees,
    a difference within :data:`AMPLIFIED_TOLERANCE` that changes no prediction is the model's rounding, accepted.
    Models with nested models are judged on their outputs alone."""
    worst = _worst_layer(k3_model, model, x)
    if worst is not None and worst[1] > LAYER_TOLERANCE:
        name, relative = worst
        layer = k3_model.get_layer(name)
        raise ModelLoadError(
            f"the tf-keras rebuild of layer '{name}' ({layer.__class__.__name__}) differs from the Keras 3 layer by "
            f"{relative:.3g} of its output on the same inputs (tolerance {LAYER_TOLERANCE:g}; the model's outputs "
            f"by {diff:.3g}); please report this layer's configuration")
    if worst is None or not (same_top1 and diff <= AMPLIFIED_TOLERANCE):
        where = ("although every layer agrees on the same inputs" if worst is not None
                 else "(a model with nested models is judged on its outputs)")
        raise ModelLoadError(
            f"the tf-keras rebuild of the Keras 3 model differs from it by {diff:.3g} {where} (tolerance "
            f"{REBUILD_TOLERANCE:g}, or {AMPLIFIED_TOLERANCE:g} with the same predictions where every layer agrees); "
            "please report this model's architecture")


def _worst_layer(k3_model: Any, model: Any, x: np.ndarray) -> tuple[str, float] | None:
    """(name, relative difference) of the rebuilt layer that differs most from its Keras 3 layer on that layer's
    own inputs; ``None`` when the model nests models or a layer is called more than once (judged on outputs)."""
    keras3 = _tf.keras3()
    layers = [layer for layer in k3_model.layers if layer.__class__.__name__ != "InputLayer"]
    if any(layer.__class__.__name__ in _MODEL_CLASSES or len(layer._inbound_nodes) != 1  # noqa: SLF001
           for layer in layers):
        return None
    tensors = [t for layer in layers for t in (*_as_list(layer.input), layer.output)]
    inputs = k3_model.inputs[0] if len(k3_model.inputs) == 1 else k3_model.inputs
    values = keras3.Model(inputs, tensors)(x, training=False)
    worst: tuple[str, float] | None = None
    position = 0
    for layer in layers:
        count = len(_as_list(layer.input))
        ins = [np.asarray(v) for v in values[position:position + count]]
        want = np.asarray(values[position + count])
        position += count + 1
        try:
            twin = model.get_layer(layer.name)
        except ValueError:  # an op node (`x + y`) has no twin layer by name
            continue
        got = np.asarray(twin(ins[0] if count == 1 else ins, training=False))
        if got.shape != want.shape:
            return layer.name, float("inf")
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        relative = float(np.max(np.abs(got - want))) / scale if scale > 0 else float(np.max(np.abs(got)))
        if worst is None or relative > worst[1]:
            worst = (layer.name, relative)
    return worst


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def rebuild_layer(layer: Any) -> Any:
    """One Keras 3 layer as an (unbuilt) tf-keras layer of the same config; :class:`ModelLoadError` if it cannot be."""
    builder = _Builder(register_activations())
    try:
        return builder.layer(layer.__class__.__name__, layer.get_config())
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot rebuild layer '{layer.name}' as tf-keras: {first_line(exc)}") from None


def _fitting(sample: np.ndarray | None, model: Any) -> np.ndarray | None:
    """``sample`` (the user's data) as the model's input dtype when its samples fit the model's input shape (token ids
    for an integer input), else ``None``: data that does not fit is refused later, with the data's name."""
    if sample is None:
        return None
    want, dtype = tuple(model.inputs[0].shape[1:]), model.inputs[0].dtype
    if sample.ndim != len(want) + 1 or any(d is not None and d != s for d, s in zip(want, sample.shape[1:])):
        return None
    sample = sample[:64]
    if dtype.is_integer:  # token ids within the first Embedding's vocabulary
        vocab = vocabulary(model)
        if not np.array_equal(sample, np.round(sample)) or sample.min() < 0 or (vocab and sample.max() >= vocab):
            return None
    return sample.astype(dtype.name)


def _random_inputs(model: Any) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = [8] + [d or 16 for d in model.inputs[0].shape[1:]]
    if model.inputs[0].dtype.is_integer:
        return rng.integers(0, vocabulary(model) or 2, size=shape).astype(model.inputs[0].dtype.name)
    return rng.standard_normal(shape).astype(np.float32)


class _Builder:
    """Builds tf-keras layers and models from Keras 3 configs; ``current`` names the layer being built."""

    def __init__(self, activation_names: dict[str, str]) -> None:
        self.activation_names = activation_names
        self.current = ""
        self.flatten: bool | None = None  # inline nested models (decided once, by the top-level config)

    def clean(self, value: Any) -> Any:
        """Keras 3 serialized objects as tf-keras's deserializers read them."""
        if isinstance(value, dict):
            if value.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
                return value["config"]["name"]
            if value.get("class_name") == "__tuple__":
                return tuple(self.clean(v) for v in value["config"]["value"])
            if value.get("class_name") == "function" and isinstance(value.get("config"), str):
                return self.activation_names.get(value["config"], value["config"])
            return {k: self.clean(v) for k, v in value.items() if k not in ("module", "registered_name")}
        if isinstance(value, list):
            return [self.clean(v) for v in value]
        return value

    def layer(self, class_name: str, config: dict) -> Any:
        keras = _tf.keras()
        self.current = config.get("name", "?")
        cls = getattr(keras.layers, class_name, None)
        if cls is None or not isinstance(cls, type):
            raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: layer '{self.current}' is a "
                                 f"{class_name}, which tf-keras does not have")
        return cls.from_config(self.layer_config(cls, self.clean(config)))

    def layer_config(self, cls: type, config: dict) -> dict:
        """A config as tf-keras ``cls`` takes it: initializers dropped (weights are copied), keys its constructor
        lacks dropped, Keras 3 activation names mapped; wrapped layers (Bidirectional, TimeDistributed) alike."""
        keras = _tf.keras()
        config = {k: v for k, v in config.items() if not k.endswith("_initializer")}
        if isinstance(config.get("activation"), str):
            config["activation"] = self.activation_names.get(config["activation"], config["activation"])
        for key in ("layer", "backward_layer"):
            inner = config.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
                inner_cls = getattr(keras.layers, inner.get("class_name", ""), None)
                if inner_cls is not None:
                    config[key] = {**inner, "config": self.layer_config(inner_cls, inner["config"])}
        accepted = set(inspect.signature(cls.__init__).parameters) | _BASE_LAYER_KWARGS
        return {**_EXTRA_CONFIG.get(cls.__name__, {}), **{k: v for k, v in config.items() if k in accepted}}

    def model(self, class_name: str, config: dict) -> Any:
        """A tf-keras model of a Keras 3 model config. Nested models are inlined (one flat model: what
        tensorflow-model-optimization and on-device training need) unless two leaf layers share a name."""
        keras = _tf.keras()
        if self.flatten is None:  # decided once, for the whole model
            self.flatten = _unique_leaf_names(config)
        if class_name == "Sequential" and not (self.flatten and _has_nested(config)):
            return self._sequential(config)
        inputs, outputs = self.body(class_name, config, None)
        return keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                           outputs[0] if len(outputs) == 1 else outputs, name=config.get("name"))

    def _input(self, config: dict, name: str | None) -> Any:
        keras = _tf.keras()
        return keras.Input(batch_shape=config.get("batch_shape") or config.get("batch_input_shape"),
                           dtype=self.clean(config.get("dtype", "float32")), name=name)

    def _built(self, spec: dict, name: str) -> Any:
        """The callable of one entry of a model config: a layer, an op node, or a nested model (inlined)."""
        if str(spec.get("module", "")).startswith("keras.src.ops"):  # `x + y`, `ops.softmax(x)` in a Keras 3 model
            return _OpNode(spec["class_name"], name, spec.get("config") or {})
        if spec["class_name"] in _MODEL_CLASSES:
            if self.flatten:
                return _Inlined(self, spec["class_name"], spec["config"])
            return self.model(spec["class_name"], spec["config"])
        return self.layer(spec["class_name"], spec["config"])

    def _sequential(self, config: dict) -> Any:
        keras = _tf.keras()
        model = keras.Sequential(name=config.get("name"))
        for spec in config["layers"]:
            cfg = spec["config"]
            model.add(self._input(cfg, cfg.get("name")) if spec["class_name"] == "InputLayer"
                      else self._built(spec, cfg.get("name", "?")))
        return model

    def body(self, class_name: str, config: dict, given: tuple | None) -> tuple[list, list]:
        """(inputs, outputs) of a model config's layers called in order; ``given`` tensors stand in for its inputs
        when it is inlined into an outer model."""
        if class_name != "Sequential":
            return self._functional_body(config, given)
        specs = config["layers"]
        if given is None:
            if not specs or specs[0]["class_name"] != "InputLayer":
                raise ModelLoadError("cannot rebuild the Keras 3 model as tf-keras: a Sequential model without "
                                     "an input shape")
            x = self._input(specs[0]["config"], specs[0]["config"].get("name"))
            inputs = [x]
        else:
            x, inputs = _single(list(given)), list(given)
        for spec in specs:
            if spec["class_name"] != "InputLayer":
                self.current = spec["config"].get("name", "?")
                x = self._built(spec, self.current)(x)
        return inputs, [x]

    def _functional_body(self, config: dict, given: tuple | None) -> tuple[list, list]:
        """Layers are created in config order; their calls (nodes) run as soon as their inputs exist, so a
        shared layer whose second call depends on later layers is still wired correctly. A node's recorded
        ``training=True`` is dropped: Keras 3 records the default of the call it traced (``training=True`` for every
        augmentation layer), which it overrides at call time, and tf-keras would bake it into the graph (a RandomFlip
        flipping at inference). ``training=False`` is kept: a user's ``base_model(x, training=False)`` keeps its
        BatchNormalization in inference mode while fine-tuning, as in Keras."""
        tensors: dict[tuple[str, int, int], Any] = {}
        pending: list[tuple[Any, str, int, dict]] = []
        input_refs = [tuple(ref) for ref in _refs(config["input_layers"])]
        given_list = list(given[0]) if given and len(given) == 1 and isinstance(given[0], (list, tuple)) \
            else list(given or [])
        implied = _implied_masks(config["layers"])
        for spec in config["layers"]:
            name = spec.get("name") or spec["config"]["name"]
            if name in implied:  # a Masking layer's mask, which tf-keras propagates with the tensor itself
                continue
            if spec["class_name"] == "InputLayer":
                ref = (name, 0, 0)
                tensors[ref] = given_list[input_refs.index(ref)] if given is not None \
                    else self._input(spec["config"], name)
                continue
            built = self._built(spec, name)
            pending.extend((built, name, i, _unmasked(node, implied))
                           for i, node in enumerate(spec.get("inbound_nodes", [])))
        while pending:
            ready = [item for item in pending if _inputs_ready(item[3], tensors)]
            if not ready:
                raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: the inputs of layer "
                                     f"'{pending[0][1]}' are never produced")
            for item in ready:
                built, name, node_index, node = item
                self.current = name
                kwargs = {k: v for k, v in node.get("kwargs", {}).items() if (k, v) != ("training", True)}
                out = built(*_resolve(node.get("args", []), tensors), **_resolve(kwargs, tensors))
                for tensor_index, tensor in enumerate(out if isinstance(out, (list, tuple)) else [out]):
                    tensors[(name, node_index, tensor_index)] = tensor
                pending.remove(item)
        return [tensors[ref] for ref in input_refs], [tensors[tuple(ref)] for ref in _refs(config["output_layers"])]


class _Inlined:
    """A nested model called inside an outer one, inlined: its layers are called on the outer tensors. Its call
    options (``training=False`` on a frozen backbone, a mask) are dropped: edgekit runs the graph in inference."""

    def __init__(self, builder: _Builder, class_name: str, config: dict) -> None:
        self.builder, self.class_name, self.config = builder, class_name, config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _single(self.builder.body(self.class_name, self.config, args)[1])


def _single(values: list) -> Any:
    return values[0] if len(values) == 1 else values


def _leaf_names(config: dict) -> list[str]:
    names = []
    for spec in config.get("layers", []):
        if spec["class_name"] in _MODEL_CLASSES:
            names += _leaf_names(spec["config"])
        elif spec["class_name"] != "InputLayer":
            names.append(spec.get("name") or spec["config"].get("name"))
    return names


def _unique_leaf_names(config: dict) -> bool:
    names = _leaf_names(config)
    return len(names) == len(set(names))


def _has_nested(config: dict) -> bool:
    return any(spec["class_name"] in _MODEL_CLASSES for spec in config.get("layers", []))


class _OpNode:
    """A Keras 3 op node (``x + y``, ``x * 0.5``, ``ops.softmax(x)``) as the standard tf-keras layer doing the same: a
    merge layer for two tensors, ``Rescaling`` for a tensor and a number, an activation layer for an activation
    (serializable, no code in the saved model)."""

    _MERGE = {"Add": "Add", "Subtract": "Subtract", "Multiply": "Multiply"}
    _ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}

    def __init__(self, op: str, name: str, config: dict) -> None:
        self.op, self.name, self.config = op, name, config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        keras = _tf.keras()
        if len(args) == 1 and not kwargs and not isinstance(args[0], (int, float)):
            return self._activation(keras)(args[0])
        numbers = [a for a in args if isinstance(a, (int, float))]
        tensors = [a for a in args if not isinstance(a, (int, float))]
        if kwargs or len(args) != 2:
            raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: op '{self.name}' ({self.op}) "
                                 "has no tf-keras layer")
        if len(tensors) == 2 and self.op in self._MERGE:
            return getattr(keras.layers, self._MERGE[self.op])(name=self.name)(tensors)
        if len(tensors) == 1 and numbers:
            scale, offset = self._affine(float(numbers[0]), tensor_first=not isinstance(args[0], (int, float)))
            return keras.layers.Rescaling(scale, offset=offset, name=self.name)(tensors[0])
        raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: op '{self.name}' ({self.op}) "
                             "has no tf-keras layer")

    def _activation(self, keras: Any) -> Any:
        """The tf-keras layer of a one-tensor activation op (``ops.softmax(x, axis)``, ``ops.relu(x)``...)."""
        if self.op == "Softmax":
            return keras.layers.Softmax(axis=self.config.get("axis", -1), name=self.name)
        if self.op in self._ACTIVATIONS:
            return keras.layers.Activation(self._ACTIVATIONS[self.op], name=self.name)
        raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: op '{self.name}' ({self.op}) "
                             "has no tf-keras layer")

    def _affine(self, c: float, *, tensor_first: bool) -> tuple[float, float]:
        """(scale, offset) with op(x, c) == x * scale + offset."""
        if self.op == "Add":
            return 1.0, c
        if self.op == "Subtract":
            return (1.0, -c) if tensor_first else (-1.0, c)
        if self.op == "Multiply":
            return c, 0.0
        if self.op in ("Divide", "TrueDivide") and tensor_first and c != 0:
            return 1.0 / c, 0.0
        raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: op '{self.name}' ({self.op}) "
                             "has no tf-keras layer")


def _implied_masks(specs: list[dict]) -> set[str]:
    """The op nodes of a Keras 3 functional config that compute a ``Masking`` layer's mask: Keras 3 records
    ``any(not_equal(x, mask_value), axis=-1)`` as two op nodes and passes it to the next layers as ``mask=``; a
    tf-keras ``Masking`` layer attaches the same mask to its output, which the layers after it read."""
    def producer(arg: Any) -> tuple | None:
        refs = _history(arg)
        return refs[0] if len(refs) == 1 and isinstance(arg, dict) else None

    masked = {(producer(node["args"][0]), float(spec["config"].get("mask_value", 0.0)))
              for spec in specs if spec["class_name"] == "Masking"
              for node in spec.get("inbound_nodes", []) if node.get("args")}
    not_equal = set()
    for spec in specs:
        nodes = spec.get("inbound_nodes", [])
        if spec["class_name"] != "NotEqual" or len(nodes) != 1 or len(nodes[0].get("args", [])) != 2:
            continue
        x, value = nodes[0]["args"]
        if isinstance(value, (int, float)) and (producer(x), float(value)) in masked:
            not_equal.add(spec.get("name") or spec["config"]["name"])
    implied = set()
    for spec in specs:
        nodes, config = spec.get("inbound_nodes", []), spec.get("config", {})
        if (spec["class_name"] == "Any" and len(nodes) == 1 and config.get("axis") == -1
                and not config.get("keepdims") and len(nodes[0].get("args", [])) == 1):
            source = producer(nodes[0]["args"][0])
            if source is not None and source[0] in not_equal:
                implied |= {spec.get("name") or config["name"], source[0]}
    return implied


def _unmasked(node: dict, implied: set[str]) -> dict:
    """``node`` without a ``mask`` argument that :func:`_implied_masks` computes (tf-keras reads it from the input)."""
    kwargs = node.get("kwargs", {})
    producers = {ref[0] for ref in _history(kwargs.get("mask"))}
    if not producers or not producers <= implied:
        return node
    return {**node, "kwargs": {k: v for k, v in kwargs.items() if k != "mask"}}


def _refs(value: list) -> list:
    return [value] if value and isinstance(value[0], str) else value


def _history(value: Any) -> list[tuple]:
    """Every (layer, node, tensor) reference inside a node's arguments."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [tuple(value["config"]["keras_history"])]
        return [ref for v in value.values() for ref in _history(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _history(v)]
    return []


def _inputs_ready(node: dict, tensors: dict) -> bool:
    return all(ref in tensors for ref in _history([node.get("args", []), node.get("kwargs", {})]))


def _resolve(value: Any, tensors: dict) -> Any:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return tensors[tuple(value["config"]["keras_history"])]
        return {k: _resolve(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(v, tensors) for v in value]
    return value


def _copy_weights(source: Any, target: Any) -> None:
    """Copy every leaf layer's weights by name (the target may be the flattened form of a nested source)."""
    by_name = {layer.name: layer for layer in iter_layers(target)}
    for layer in iter_layers(source):
        weights = layer.get_weights()
        if not weights:
            continue
        twin = by_name.get(layer.name)
        if twin is None:
            raise ModelLoadError(f"layer '{layer.name}' was lost in the tf-keras rebuild")
        mine = twin.get_weights()
        if len(mine) != len(weights) or any(a.shape != b.shape for a, b in zip(mine, weights)):
            raise ModelLoadError(f"cannot rebuild the Keras 3 model as tf-keras: layer '{layer.name}' "
                                 f"({layer.__class__.__name__}) holds its weights differently in tf-keras")
        twin.set_weights(weights)
