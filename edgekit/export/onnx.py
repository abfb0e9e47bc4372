"""ONNX export with tf2onnx (opset 17, explicit input signature) and onnxruntime quantization."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agents.errors import first_line
from edgekit import _tf
from edgekit._io import temp_dir, temporary_dir
from edgekit.config import Quantization
from edgekit.errors import ConversionError
from edgekit.export.remedies import (
    ENTROPY_BINS,
    MAX_FLOAT_NODES,
    SENSITIVITY_SAMPLES,
    Calibration,
    ErrorSums,
    Int8Options,
    IntType,
    OnnxFormat,
    OnnxQuantizer,
    node_groups,
    rank_nodes,
)

if TYPE_CHECKING:
    from edgekit.export.accuracy_control import AccuracyControl

OPSET = 17
INPUT_NAME = "input"


def to_onnx(model: Any, *, quantization: Quantization, calibration: np.ndarray) -> tuple[bytes, list[str]]:
    """Convert a tf-keras model to ONNX and quantize it as asked.

    int8: onnxruntime's static QDQ quantization, per channel, calibrated on ``calibration``
    (after ``quant_pre_process``). QAT: ``model`` is the QAT model itself; tf2onnx turns its
    activation fake-quants into QDQ pairs with the learned ranges and folds the fake-quantized weights
    into float constants, which :func:`int8_weights` stores as int8.
    dynamic: int8 weights. float16: onnxruntime's float16 converter, float32 I/O kept.
    """
    proto = float_onnx(model)
    notes: list[str] = []
    if quantization is Quantization.QAT:
        proto, left_float = int8_weights(proto)
        if left_float:
            notes.append(f"weights left float (not on an int8 grid): {', '.join(left_float)}")
        return compact_names(proto.SerializeToString()), notes
    if quantization is Quantization.NONE:
        return compact_names(proto.SerializeToString()), notes
    if quantization is Quantization.FLOAT16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return compact_names(convert_float_to_float16(proto, keep_io_types=True).SerializeToString()), notes
    try:
        if quantization is Quantization.DYNAMIC:
            return compact_names(_quantize_dynamic(proto)), notes
        with OnnxInt8(proto, calibration) as quantizer:
            return quantizer.quantize(Int8Options()), notes
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"onnxruntime {quantization.value} quantization failed: {first_line(exc)}") from None


def _quantize_dynamic(proto: Any, *, op_types: tuple[str, ...] = (), per_channel: bool = True) -> bytes:
    """onnxruntime's dynamic quantization (int8 weights) of ``proto``'s ``op_types`` (every type it quantizes when
    empty)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with temporary_dir("onnx") as tmp:
        src, out = Path(tmp, "float.onnx"), Path(tmp, "quant.onnx")
        src.write_bytes(proto.SerializeToString())
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types) or None)
        return out.read_bytes()


_RECURRENT = frozenset({"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"})


def float_weights(data: bytes) -> dict[str, int]:
    """Op type -> how many float weights (initializers of two or more dimensions, read without a
    DequantizeLinear; a recurrent op's input and recurrence weights, not its biases) its nodes in the ``.onnx``
    still hold: what a quantizer left float.

    >>> float_weights(float_model_bytes)          # doctest: +SKIP
    {'GRU': 37248}
    """
    import math

    import onnx

    graph = onnx.load_from_string(data).graph
    floats = {i.name: math.prod(i.dims) for i in graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}
    left: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            continue
        inputs = node.input[1:3] if node.op_type in _RECURRENT else node.input
        for name in inputs:
            if name in floats:
                left[node.op_type] = left.get(node.op_type, 0) + floats.pop(name)
    return left


def size_rungs(data: bytes) -> list[tuple[str, dict[str, object]]]:
    """The size rungs an int8 ``.onnx`` adds for itself: :data:`~edgekit.export.remedies.DYNAMIC_LSTM` when
    onnxruntime's static quantizer left an LSTM's weights float (:func:`float_weights`)."""
    from edgekit.export.remedies import DYNAMIC_LSTM

    return [(DYNAMIC_LSTM, {"dynamic_ops": ("LSTM",)})] if "LSTM" in float_weights(data) else []


def float_onnx(model: Any) -> Any:
    """The float32 ONNX ModelProto of a tf-keras model or of a SavedModel's serving graph (tf2onnx).

    The last few conversions are kept (a model's int8 export, its float32 reference and its remedies each start
    from it; tf2onnx's optimizer takes 16 s of DenseNet121's conversion); each call gets its own copy, and a
    model whose weights changed since is converted again."""
    import onnx

    fingerprint = _fingerprint(model)
    data = _RECENT.get(model, fingerprint)
    if data is None:
        data = _float_onnx(model).SerializeToString()
        _RECENT.put(model, fingerprint, data)
    return onnx.load_from_string(data)


class _Recent:
    """A few recent conversions by model object (held weakly: a collected model's entry never matches again)."""

    SIZE = 4

    def __init__(self) -> None:
        self._entries: list[tuple[Any, str, bytes]] = []  # (weakref to the model, fingerprint, serialized proto)

    def get(self, model: Any, fingerprint: str) -> bytes | None:
        return next((data for ref, key, data in self._entries if ref() is model and key == fingerprint), None)

    def put(self, model: Any, fingerprint: str, data: bytes) -> None:
        import weakref

        live = [e for e in self._entries if e[0]() is not None and e[0]() is not model]
        self._entries = [*live[-(self.SIZE - 1):], (weakref.ref(model), fingerprint, data)]


_RECENT = _Recent()


def _fingerprint(model: Any) -> str:
    """What the conversion depends on besides the model object: its weights (a graph's are on disk, read-only)."""
    import hashlib

    from edgekit.loading.graph import SavedModelGraph

    if isinstance(model, SavedModelGraph):
        return str(model.path)
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def _float_onnx(model: Any) -> Any:
    from edgekit.loading.graph import SavedModelGraph

    tf = _tf.tf()
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # its optimizer logs tracebacks it recovers from
    try:
        if isinstance(model, SavedModelGraph):  # the serving graph, frozen as tf2onnx's --saved-model does
            from tf2onnx import tf_loader

            graph_def, inputs, outputs = tf_loader.from_saved_model(
                str(model.path), None, None, tag="serve", signatures=["serving_default"])[:3]
            graph_def = _erfc_as_erf(_inline_xla_functions(graph_def, inputs, outputs))
            proto, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs,
                                                      opset=OPSET, tensors_to_rename={inputs[0]: INPUT_NAME})
        else:
            spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype, name=INPUT_NAME)]
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    except Exception as exc:
        raise ConversionError(f"tf2onnx conversion failed: {first_line(exc)}") from None
    _check_onnx_ops(proto)
    return proto


_NO_INLINE = ("_XlaMustCompile", "_noinline")
_CALLS = ("StatefulPartitionedCall", "PartitionedCall")


def _inline_xla_functions(graph_def: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The frozen graph with the functions marked for XLA inlined: Keras 3 runs a grouped convolution (ConvNeXt's
    depthwise Conv2D with ``groups``) in a ``jit_compile`` function, which grappler does not inline and tf2onnx
    cannot convert. Without the XLA marks, grappler inlines it into plain ops."""
    if not any(node.op in _CALLS for node in graph_def.node):
        return graph_def
    from tf2onnx import tf_loader

    for attrs in (*(node.attr for node in graph_def.node), *(f.attr for f in graph_def.library.function)):
        for key in _NO_INLINE:
            if key in attrs:
                del attrs[key]
    with _tf.tf().Graph().as_default():
        return tf_loader.tf_optimize(inputs, outputs, graph_def)


def _erfc_as_erf(graph_def: Any) -> Any:
    """The frozen graph with every ``Erfc(x)`` written as ``1 - Erf(x)``: TensorFlow's exact GELU uses ``Erfc``,
    which ONNX does not define (ConvNeXt); ``Erf`` converts."""
    from tensorflow.core.framework import node_def_pb2  # TensorFlow is loaded (edgekit._tf) by float_onnx
    from tensorflow.python.framework import tensor_util

    nodes = []
    for node in graph_def.node:
        if node.op != "Erfc":
            nodes.append(node)
            continue
        dtype = node.attr["T"].type
        erf = node_def_pb2.NodeDef(name=f"{node.name}/erf", op="Erf", input=[node.input[0]])
        erf.attr["T"].type = dtype
        one = node_def_pb2.NodeDef(name=f"{node.name}/one", op="Const")
        one.attr["dtype"].type = dtype
        one.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(1.0, dtype=dtype))
        sub = node_def_pb2.NodeDef(name=node.name, op="Sub", input=[one.name, erf.name],
                                   device=node.device)
        sub.attr["T"].type = dtype
        nodes += [erf, one, sub]
    if len(nodes) == len(graph_def.node):
        return graph_def
    del graph_def.node[:]
    graph_def.node.extend(nodes)
    return graph_def


def _check_onnx_ops(proto: Any) -> None:
    """Refuse a graph with an op ONNX does not define (an op tf2onnx left as TensorFlow's), naming op and node."""
    import onnx

    for node in proto.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise ConversionError(f"tf2onnx left the TensorFlow op {node.op_type} unconverted (node {node.name}); "
                                  "ONNX has no such op")


def affine_batchnorm(proto: Any) -> Any:
    """The model with every BatchNormalization that onnxruntime cannot fold into a preceding Conv or Gemm (a
    pre-activation BN: concat -> BN -> ReLU -> conv, as in DenseNet; a BN on a conv output that also goes
    elsewhere) written as Mul and Add.

    onnxruntime's QDQ quantizer has no BatchNormalization kernel, so such a BN would run in float between a
    DequantizeLinear and a QuantizeLinear; as Mul and Add it is quantized, as the TFLite converter does.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(proto)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producer = {out: node.op_type for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)}
    nodes, rewritten = [], set()
    for node in graph.node:
        params = node.input[1:5]
        foldable = producer.get(node.input[0]) in ("Conv", "ConvTranspose", "Gemm") and consumers[node.input[0]] == 1
        if node.op_type != "BatchNormalization" or foldable or len(params) != 4 \
                or not all(name in inits for name in params) or len(node.output) != 1:
            nodes.append(node)
            continue
        rewritten.update(params)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in params)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        shape = [-1] + [1] * max(ranks.get(node.input[0], 4) - 2, 0)
        names = (f"{node.name}_scale", f"{node.name}_shift", f"{node.name}_scaled")
        graph.initializer.extend([numpy_helper.from_array(scale.reshape(shape).astype(np.float32), names[0]),
                                  numpy_helper.from_array((beta - mean * scale).reshape(shape).astype(np.float32),
                                                          names[1])])
        nodes += [helper.make_node("Mul", [node.input[0], names[0]], [names[2]], name=f"{node.name}_mul"),
                  helper.make_node("Add", [names[2], names[1]], [node.output[0]], name=f"{node.name}_add")]
    del graph.node[:]
    graph.node.extend(nodes)
    used = _names_used(graph)
    kept = [init for init in graph.initializer if init.name not in rewritten or init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)  # the rewritten BNs' own parameters go (onnxruntime warned of each)
    return model


def _names_used(graph: Any) -> set[str]:
    """Every tensor name the nodes of ``graph`` and of its subgraphs (If, Loop, Scan bodies) read, and its
    outputs."""
    import onnx

    used = {out.name for out in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                        attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                used |= _names_used(sub)
    return used


CALIBRATION_BATCH = 32  # samples per calibration run when the model's batch dimension is free


def _batch(proto: Any) -> int:
    """``proto``'s fixed batch dimension, or 0 when it is free."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].dim_value > 0 else 0


def _reader(samples: np.ndarray, fixed_batch: int = 0) -> Any:
    """An onnxruntime CalibrationDataReader over ``samples`` in runs of equal size (onnxruntime's histogram
    calibrators stack them): the largest divisor of the sample count up to :data:`CALIBRATION_BATCH`, or
    ``fixed_batch`` when the model's batch dimension is fixed (then a remainder is left out)."""
    from onnxruntime.quantization import CalibrationDataReader

    batch = fixed_batch or max(b for b in range(1, CALIBRATION_BATCH + 1) if len(samples) % b == 0)
    usable = len(samples) - len(samples) % batch

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: samples[i:min(i + batch, usable)]} for i in range(0, usable, batch)])

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    return Reader()


def _quantize_static(pre: Path, out: Path, calibration: np.ndarray, options: Int8Options,
                     ranges: dict[str, Any] | None = None, batch: int = 0) -> None:
    """onnxruntime's static quantization of the pre-processed float model ``pre`` with ``options`` (``ranges``:
    the entropy ranges of ``pre``, when already computed)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    types = {IntType.INT8: QuantType.QInt8, IntType.UINT8: QuantType.QUInt8, IntType.INT16: QuantType.QInt16}
    extra: dict[str, Any] = {}
    method = {Calibration.MINMAX: CalibrationMethod.MinMax, Calibration.MOVING_AVERAGE: CalibrationMethod.MinMax,
              Calibration.ENTROPY: CalibrationMethod.MinMax,
              Calibration.PERCENTILE: CalibrationMethod.Percentile}[options.calibration]
    if options.calibration is Calibration.ENTROPY:
        extra["TensorQuantOverrides"] = ranges if ranges is not None else _entropy_ranges(pre, calibration, batch)
    runs = batch
    if options.calibration is Calibration.MOVING_AVERAGE:
        # onnxruntime averages the min and max of each calibration run: one sample a run (unless the model's batch
        # is fixed) makes them each sample's
        extra["CalibMovingAverage"] = True
        runs = batch or 1
    with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print their progress
        quantize_static(
            str(pre), str(out), _reader(calibration, runs),
            quant_format=QuantFormat.QOperator if options.onnx_format is OnnxFormat.QOPERATOR else QuantFormat.QDQ,
            per_channel=options.per_channel, reduce_range=options.reduce_range,
            activation_type=types[options.activations], weight_type=types[options.weights],
            calibrate_method=method, nodes_to_exclude=list(options.float_nodes), extra_options=extra)


def _entropy_ranges(pre: Path, calibration: np.ndarray, batch: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Activation ranges by onnxruntime's entropy (KL) calibrator over a 2048-bin histogram, as tensor overrides.

    ``quantize_static`` builds its entropy calibrator with 128 histogram bins for 128 quantized bins, where the
    KL search has a single candidate (the full range: min-max); the calibrator itself takes the bin counts.
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from edgekit.export.entropy import fast_histogram_collector

    with temporary_dir("entropy") as tmp:
        calibrator = create_calibrator(str(pre), augmented_model_path=str(Path(tmp, "augmented.onnx")),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": ENTROPY_BINS[0],
                                                      "num_quantized_bins": ENTROPY_BINS[1]})
        calibrator.collector = fast_histogram_collector(  # the collector it would make, its KL search vectorised
            method=calibrator.method, symmetric=calibrator.symmetric, num_bins=calibrator.num_bins,
            num_quantized_bins=calibrator.num_quantized_bins, percentile=calibrator.percentile,
            scenario=calibrator.scenario)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            calibrator.collect_data(_reader(calibration, batch))
            ranges = calibrator.compute_data()
    return {name: [{"rmin": np.float32(np.min(data.range_value[0])), "rmax": np.float32(np.max(data.range_value[1]))}]
            for name, data in ranges.items()}


class OnnxInt8:
    """onnxruntime's static int8 quantizer on one model, converted and pre-processed once (a context manager).

    >>> with OnnxInt8(float_onnx(model), calibration) as quantizer:                      # doctest: +SKIP
    ...     data = quantizer.quantize(Int8Options(calibration=Calibration.ENTROPY))
    """

    def __init__(self, proto: Any, calibration: np.ndarray) -> None:
        """``proto``: the float ONNX model (:func:`float_onnx`); ``calibration``: samples for the ranges."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self._tmp = temp_dir("onnx")
        self._calibration = calibration
        self._pre = Path(self._tmp, "pre.onnx")
        self._entropy: dict[str, Any] | None = None
        self._searched: dict[Int8Options, bytes] = {}  # NNCF's artifacts by the options that name them
        self._ranked: dict[Int8Options, list[tuple[str, ...]]] = {}  # sensitive_nodes by options
        self._batch = _batch(proto)
        src = Path(self._tmp, "float.onnx")
        src.write_bytes(affine_batchnorm(proto).SerializeToString())
        quant_pre_process(str(src), str(self._pre), skip_symbolic_shape=True)

    def __enter__(self) -> OnnxInt8:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def quantize(self, options: Int8Options) -> bytes:
        """The int8 model (names compacted: :func:`compact_names`)."""
        return compact_names(self._quantized(options))

    def _quantized(self, options: Int8Options) -> bytes:
        if options.float_ops:
            raise ValueError("op types kept float by type are a TFLite option; ONNX keeps nodes float by name")
        if options.searched:
            if options not in self._searched:
                raise ValueError("NNCF's accuracy control runs as a search on labelled data (accuracy_controlled)")
            return self._searched[options]
        out = Path(self._tmp, "quant.onnx")
        if options.calibration is Calibration.ENTROPY and self._entropy is None:  # the KL search is slow: once
            self._entropy = _entropy_ranges(self._pre, self._calibration, self._batch)
        _quantize_static(self._pre, out, self._calibration, options, self._entropy, self._batch)
        data = out.read_bytes()
        import onnx

        if options.bias_correction:
            from edgekit.export.bias_correction import correct_biases

            data = correct_biases(onnx.load(str(self._pre)), data, self._calibration, batch=self._batch)
        if options.dynamic_ops:
            data = _quantize_dynamic(onnx.load_from_string(data), op_types=options.dynamic_ops,
                                     per_channel=options.per_channel)
        return data

    def accuracy_controlled(self, control: AccuracyControl, base: Int8Options) -> list[tuple[str, Int8Options]]:
        """NNCF's accuracy-controlled quantization (:func:`edgekit.export.accuracy_control.accuracy_controlled`) of
        the pre-processed float model, as two rungs, the faster first: onnxruntime's int8 with ``base``'s settings
        and, in place of the nodes ``base`` keeps float (an error ranking's, which missed the budget), the
        operations NNCF kept float, each with the nodes that feed it (:func:`node_groups`: onnxruntime quantizes a
        tensor any of its nodes reads in int8), extended by edgekit's greedy search
        (:func:`~edgekit.export.accuracy_control.greedy_float_nodes`, up to
        :data:`~edgekit.export.remedies.MAX_FLOAT_NODES` nodes) when those miss the goal on the validation split
        (NNCF chose them for its own calibration); then NNCF's own artifact (its own calibration and placement;
        ``base`` does not apply to it)."""
        import onnx

        from edgekit.export.accuracy_control import (
            MAX_CANDIDATES,
            NNCF_NODES_RUNG,
            NNCF_RUNG,
            accuracy_controlled,
            greedy_float_nodes,
        )

        float_model = onnx.load(str(self._pre))
        found = accuracy_controlled(float_model, self._calibration, control.validation,
                                    max_drop=control.max_drop, input_name=INPUT_NAME, batch=self._batch,
                                    clock=control.clock)
        searched = Int8Options(onnx_quantizer=OnnxQuantizer.NNCF, float_nodes=found.reverted)
        self._searched[searched] = found.data
        if not found.reverted:  # NNCF's own calibration did it: nothing to keep float in onnxruntime's
            return [(NNCF_RUNG, searched)]
        settings = replace(base, float_nodes=())
        # each step of the search quantizes again: bias correction (a model run per corrected node) is applied to
        # the rung, not to every step
        steps = replace(settings, bias_correction=False)
        groups = node_groups(_graph_nodes(float_model.graph))
        nodes = tuple(dict.fromkeys(n for name in found.reverted for n in groups.get(name, (name,))))
        try:
            ranked = self.sensitive_nodes(steps)
        except Exception:  # noqa: BLE001 (no error ranking on this model: graph order alone)
            ranked = []
        candidates = list(dict.fromkeys([*ranked, *groups.values()]))[:MAX_CANDIDATES]
        nodes = greedy_float_nodes(lambda names: self._quantized(replace(steps, float_nodes=names)), candidates,
                                   self._pre.read_bytes(), control, max_nodes=MAX_FLOAT_NODES, start=nodes)
        return [(NNCF_NODES_RUNG, replace(settings, float_nodes=nodes)), (NNCF_RUNG, searched)]

    def runnable_rungs(self) -> list[tuple[str, Int8Options]]:
        """None: onnxruntime refuses what it cannot run with an exception, which the ladder's rungs answer."""
        return []

    def sensitive_nodes(self, options: Int8Options) -> list[tuple[str, ...]]:
        """Nodes of the float graph, those whose quantization with ``options`` adds most to the intermediate
        error first; ranked once per options (the fallback and the search rank from the same ones)."""
        if options not in self._ranked:
            self._ranked[options] = self._rank(options)
        return self._ranked[options]

    def _rank(self, options: Int8Options) -> list[tuple[str, ...]]:
        quantized = self._quantized(options)
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

        sessions = []
        options = ort.SessionOptions()  # as onnxruntime's own collect_activations runs them
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        for kind, path in (("float", self._pre), ("quant", Path(self._tmp, "sens.onnx"))):
            if kind == "quant":
                path.write_bytes(quantized)
            augmented = Path(self._tmp, f"aug-{kind}.onnx")
            modify_model_output_intermediate_tensors(str(path), str(augmented))
            sessions.append(ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"]))
        sums = ErrorSums()
        reader = _reader(self._calibration[:SENSITIVITY_SAMPLES], self._batch)
        while (feed := reader.get_next()) is not None:  # batch by batch: memory is one batch's tensors
            ref, quant = ({_saved_name(o.name): v for o, v in zip(s.get_outputs(), s.run(None, feed))}
                          for s in sessions)
            for name, value in ref.items():
                other = quant.get(f"{name}_DequantizeLinear_Output", quant.get(name))
                if other is not None:
                    sums.add(name, other, value)
        errors = sums.errors()
        graph = onnx.load(str(self._pre)).graph
        return rank_nodes(_graph_nodes(graph), errors)


def _graph_nodes(graph: Any) -> list[tuple[str, list[str], list[str]]]:
    """(name, input tensor names, output tensor names) of each named node, as :func:`node_groups` and
    :func:`rank_nodes` take them. Integer constants (a Reshape's shape, a Squeeze's axes) are left out of the
    inputs: they make no node a computing one, so the walk up from a node kept float goes on through the Reshape
    and Transpose nodes tf2onnx writes to the op that computed the values (as it does through a TFLite reshape)."""
    import onnx

    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    constants = {t.name for t in graph.initializer if t.data_type in integer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output
                  and any(a.t.data_type in integer for a in n.attribute if a.name == "value")}
    return [(n.name, [i for i in n.input if i and i not in constants], list(n.output)) for n in graph.node if n.name]


SAVED_SUFFIX = "_ReshapedSavedOutput"
"""What onnxruntime's ``modify_model_output_intermediate_tensors`` appends to each tensor it saves as an output
(its ``collect_activations`` strips it the same way)."""


def _saved_name(name: str) -> str:
    """The graph's own name of an output of an augmented model."""
    return name.removesuffix(SAVED_SUFFIX)


def compact_names(data: bytes) -> bytes:
    """The model with short tensor and node names (``t12``, ``n34``) and no ``value_info`` or doc strings: the
    graph's input and output names stay. tf2onnx and the quantizer write long scoped names (a third of
    MobileNetV2's int8 file); the runtime needs none of them. Names of the graph as converted are in the float
    model (remedies name nodes by them). A graph with subgraphs (If, Loop, Scan) is returned unchanged."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node
           for attr in node.attribute):  # If/Loop/Scan bodies refer to outer names: left as they are
        return data
    keep = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(graph.node):
        node.name, node.doc_string = f"n{i}", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    graph.doc_string = ""
    return model.SerializeToString()


def onnx_ops(data: bytes) -> list[str]:
    """Operator types of an ONNX model, in graph order."""
    import onnx

    return [node.op_type for node in onnx.load_from_string(data).graph.node]



GRID_TOLERANCE = 1e-3  # in quantization steps


def int8_weights(proto: Any) -> tuple[Any, list[str]]:
    """Store fake-quantized float weights of Conv/MatMul/Gemm as int8 behind DequantizeLinear.

    A QAT model's weights already lie on a symmetric int8 grid: per output channel (tfmot's
    conv kernels) or per tensor (dense kernels). The scale is recovered as max|w| / 127 and checked:
    a weight that is on neither grid is left float and named in the returned list.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, left_float = [], []
    for node in graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits \
                and users.get(node.input[1], 0) == 1:
            name = node.input[1]
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis = 0 if node.op_type == "Conv" or trans_b else w.ndim - 1
            q = _on_grid(w, axis)
            if q is None:
                left_float.append(name)
            else:
                values, scale = q
                graph.initializer.remove(inits[name])
                graph.initializer.extend([
                    numpy_helper.from_array(values, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point")])
                attrs = {"axis": axis} if scale.ndim == 1 else {}
                new_nodes.append(helper.make_node(
                    "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                    [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", **attrs))
                node.input[1] = f"{name}_dequantized"
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.checker.check_model(proto)
    return proto, left_float


def _on_grid(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 values, scales) if ``w`` is symmetric int8 per channel along ``axis``, or per tensor."""
    others = tuple(i for i in range(w.ndim) if i != axis)
    for per_channel in (True, False):
        peak = np.abs(w).max(axis=others) if per_channel else np.array(np.abs(w).max(), np.float32)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        if per_channel:
            shape[axis] = -1
        steps = w / scale.reshape(shape)
        if np.abs(steps - np.round(steps)).max() <= GRID_TOLERANCE:
            return np.clip(np.round(steps), -127, 127).astype(np.int8), scale
    return None
