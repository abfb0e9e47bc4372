"""TFLite export with the TFLite converter: float32, dynamic range, float16, int8 and QAT."""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agents.errors import first_line
from device_agents.store.isolation import probe_artifact
from edgekit import _tf
from edgekit.config import Quantization
from edgekit.errors import ConversionError
from edgekit.export.remedies import (
    ENTROPY_BINS,
    FLOAT_OPS,
    MAX_FLOAT_NODES,
    SENSITIVITY_SAMPLES,
    Calibration,
    ErrorSums,
    Int8Options,
    TfliteQuantizer,
    node_groups,
    rank_nodes,
)

if TYPE_CHECKING:
    from edgekit.export.accuracy_control import AccuracyControl


def to_tflite(model: Any, *, quantization: Quantization, calibration: np.ndarray,
              int8_io: bool = False) -> tuple[bytes, list[str]]:
    """Convert a tf-keras model, or a model's serving graph; return the flatbuffer and notes.

    ``calibration`` samples feed the representative dataset of full-integer quantization.
    ``model`` is the QAT model itself for ``Quantization.QAT``, or a
    :class:`~edgekit.loading.graph.SavedModelGraph` (any layer the converter takes).
    """
    tf = _tf.tf()
    source = _Source.of(model)
    conv = source.converter(quantization, calibration, int8_io=int8_io)
    if quantization is Quantization.INT8:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return _shipped(source.signed(bytes(conv.convert())), quantization), source.notes
    except Exception as exc:  # the converter raises ConverterError and others
        if quantization is not Quantization.INT8:
            raise _failure(exc, quantization, _layer_names(model)) from None
        strict_error = first_line(exc, prefer='error:')
        if "TensorList" in strict_error:  # no builtin kernel at all, int8 or float: the fallback fails the same
            raise ConversionError(f"TFLite int8 conversion failed: {_loop_failure(model) or strict_error}") from None
    # Some ops (e.g. LSTM pieces) have no int8 kernel: keep those in float.
    conv = source.converter(quantization, calibration, int8_io=int8_io)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        data = _shipped(source.signed(bytes(conv.convert())), quantization)
    except Exception as exc:
        raise _failure(exc, quantization, _layer_names(model)) from None
    return data, [*source.notes, f"some ops have no int8 kernel and stay float ({strict_error[:120]})"]


def _shipped(data: bytes, quantization: Quantization) -> bytes:
    """A quantized artifact is :func:`compact`; the float32 one keeps its tensor names, which the tools that take a
    float ``.tflite`` read (the LiteRT Quantizer fails without them; Model Explorer and Netron show them)."""
    return data if quantization is Quantization.NONE else compact(data)


class _Source:
    """What the converter is given: a tf-keras model (recurrent layers unrolled when they can be) or a graph."""

    def __init__(self, model: Any, *, graph: bool, recurrent: bool, notes: list[str]) -> None:
        self.model, self.graph, self.recurrent, self.notes = model, graph, recurrent, notes
        self.float_input = np.issubdtype(np.dtype(model.input_dtype), np.floating) if graph else \
            model.inputs[0].dtype.is_floating

    @classmethod
    def of(cls, model: Any) -> _Source:
        from edgekit.loading.graph import SavedModelGraph

        notes: list[str] = []
        graph = isinstance(model, SavedModelGraph)
        if not graph:
            model = _static_group_norms(model)
        recurrent = not graph and has_recurrent_layer(model)
        if recurrent:
            unrolled = _unrolled(model)
            if unrolled is not None:  # plain ops, no state kept between invoke() calls: right in any runtime
                model, recurrent = unrolled, False
                notes.append("recurrent layers unrolled over the fixed sequence length: the artifact keeps no "
                             "state between invoke() calls")
            else:
                notes.append("stateful: recurrent layers convert at a fixed batch size of 1 as TFLite's fused LSTM, "
                             "which keeps its state in variable tensors; call interpreter.reset_all_variables() "
                             "before every invoke() (edgekit's agent does)")
        return cls(model, graph=graph, recurrent=recurrent, notes=notes)

    def signed(self, data: bytes) -> bytes:
        """The converted ``data`` with the ``serving_default`` signature a Keras model's conversion has."""
        if self.graph or self.recurrent:  # converted from a SavedModel: the converter wrote its signatures
            return data
        names = getattr(self.model, "output_names", None) or ["output_0"]
        return with_serving_signature(data, input_name=_input_name(self.model), output_name=str(names[0]))

    def converter(self, quantization: Quantization, calibration: np.ndarray, *, int8_io: bool) -> Any:
        from edgekit.loading.graph import SIGNATURE

        tf, model = _tf.tf(), self.model
        if self.graph:
            conv = tf.lite.TFLiteConverter.from_saved_model(str(model.path), signature_keys=[SIGNATURE])
        elif self.recurrent:  # a free batch dimension leaves TensorList ops that need Select TF ops
            spec = tf.TensorSpec([1, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
            concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
            conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)
        else:
            conv = tf.lite.TFLiteConverter.from_concrete_functions([inference_function(model)], model)
            conv.experimental_lower_to_saved_model = False  # see inference_function
        if quantization is not Quantization.NONE:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization is Quantization.FLOAT16:
            conv.target_spec.supported_types = [tf.float16]
        if quantization is Quantization.INT8:
            conv.representative_dataset = _representative(calibration)
        if quantization in (Quantization.INT8, Quantization.QAT) and int8_io and self.float_input:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        return conv


def inference_function(model: Any) -> Any:
    """``model``'s inference (``training=False``) traced once as a concrete function, batch dimension free.

    The converter's ``from_keras_model`` first saves the model as a SavedModel and loads it back (tf-keras
    serialization traces every layer's functions: 18 of the 19 s a MobileNetV2 conversion took, 45 s for
    DenseNet121, and memory); the frozen concrete function converts to the same flatbuffer ops and outputs
    (identical on MobileNetV2 float32 and int8) in 1.2 s for MobileNetV2, 4-6 s for DenseNet121. Its lack of a
    signature is made good by :func:`with_serving_signature`."""
    tf = _tf.tf()
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype, name=_input_name(model))
    return tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)


def _input_name(model: Any) -> str:
    names = getattr(model, "input_names", None) or ["input"]
    return str(names[0])


def _rewritten(data: bytes, edit: Callable[[Any], bool]) -> bytes:
    """``data`` read into TensorFlow's flatbuffer object model, changed by ``edit`` and written back; unchanged when
    ``edit`` returns False, or when the file is too large for a flatbuffer rewrite (2 GB: the converter stores
    larger weights outside the flatbuffer)."""
    from tensorflow.lite.tools import flatbuffer_utils

    if len(data) >= 2**31 - 2**20:
        return data
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    if not edit(model):
        return data
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def with_serving_signature(data: bytes, *, input_name: str, output_name: str) -> bytes:
    """``data`` with a ``serving_default`` signature over its first subgraph's input and output (what the
    converter writes for a SavedModel or Keras model, and what LiteRT's signature runners and Android's
    ``runSignature`` call), unchanged when it has signatures already, or is too large for a flatbuffer rewrite
    (2 GB: the converter stores larger weights outside the flatbuffer)."""
    from tensorflow.lite.python import schema_py_generated as schema

    def add(model: Any) -> bool:
        if model.signatureDefs or len(model.subgraphs) != 1:
            return False
        graph = model.subgraphs[0]
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            return False
        signature = schema.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = SERVING, 0
        signature.inputs, signature.outputs = [_tensor_map(input_name, graph.inputs[0])], \
            [_tensor_map(output_name, graph.outputs[0])]
        model.signatureDefs = [signature]
        return True

    return _rewritten(data, add)


SERVING = "serving_default"
CONVERSION_METADATA = b"CONVERSION_METADATA"


def compact(data: bytes) -> bytes:
    """``data`` without what no runtime reads: the names of intermediate tensors (each subgraph's inputs and
    outputs keep theirs; signatures keep their keys and names), the model's description and the converter's
    ``CONVERSION_METADATA`` (its options, for tooling). Ops, weights and quantization parameters stay as they are,
    so the artifact computes the same values; ``data`` is returned unchanged when it is too large for a flatbuffer
    rewrite (2 GB). For quantized artifacts, which no tool quantizes again (:func:`_shipped`). The names took
    18 KB of MobileNetV2 0.35's 632 KB per-channel int8 ``.tflite``.

    >>> len(compact(data)) < len(data)                                       # doctest: +SKIP
    True
    """

    def strip(model: Any) -> bool:
        model.description = None
        for graph in model.subgraphs:
            kept = {*graph.inputs, *graph.outputs}
            for index, tensor in enumerate(graph.tensors):
                if index not in kept:
                    tensor.name = None
        for entry in [m for m in model.metadata or () if m.name == CONVERSION_METADATA]:
            model.buffers[entry.buffer].data = None
            model.metadata.remove(entry)
        return True

    return _rewritten(data, strip)


def _tensor_map(name: str, index: int) -> Any:
    from tensorflow.lite.python import schema_py_generated as schema

    mapping = schema.TensorMapT()
    mapping.name, mapping.tensorIndex = name, int(index)
    return mapping


class TfliteInt8:
    """The TFLite converter's int8 quantization of one model, calibrated once and re-quantized with options, as
    TensorFlow's own quantization debugger does (``mlir_quantize`` with per-tensor weights or denylisted nodes).

    >>> with TfliteInt8(model, calibration, int8_io=False) as quantizer:      # doctest: +SKIP
    ...     data = quantizer.quantize(Int8Options(per_channel=False))
    """

    def __init__(self, model: Any, calibration: np.ndarray, *, int8_io: bool) -> None:
        source = _Source.of(model)
        conv = source.converter(Quantization.INT8, calibration, int8_io=int8_io)
        conv.experimental_mlir_quantizer = True
        conv._experimental_calibrate_only = True  # noqa: SLF001 (the debugger's documented route)
        self._calibrated = bytes(conv.convert())
        self._source, self._calibration = source, calibration
        self._float: bytes | None = None  # the float32 .tflite, for the LiteRT Quantizer
        self._clipped: dict[Calibration, bytes] = {}  # the calibrated model with clipped ranges, by calibration
        self._signed = source.signed
        self._int8_io = int8_io and source.float_input
        self._samples = calibration[:SENSITIVITY_SAMPLES]
        self._ranked: dict[Int8Options, list[tuple[str, ...]]] = {}  # sensitive_nodes by options: the search
        # and the fallback after it both rank from the same options when the search gained nothing

    def __enter__(self) -> TfliteInt8:
        return self

    def __exit__(self, *exc: object) -> None:
        self._calibrated = b""

    def quantize(self, options: Int8Options) -> bytes:
        """The int8 artifact quantized with ``options``, as it ships (:func:`compact`)."""
        return compact(self._quantized(options))

    def _quantized(self, options: Int8Options) -> bytes:
        """The quantized flatbuffer with the converter's tensor names (the sensitivity pass matches tensors by
        name)."""
        from tensorflow.lite.python import convert

        if options.bias_correction:
            raise ValueError("bias correction is an ONNX rung (edgekit corrects onnxruntime's QDQ graph); the "
                             "converter's int8 has none")
        if options.dynamic_ops:
            raise ValueError("dynamic quantization of op types left float is an ONNX rung (onnxruntime's static "
                             "quantizer has no LSTM rule); the TFLite converter has no such option")
        if options.tflite_quantizer is TfliteQuantizer.LITERT:
            return self._litert(options)
        if options.wide_activations:
            return self._int16x8(options)
        tf = _tf.tf()
        io_type = tf.int8 if self._int8_io else tf.float32
        return self._signed(bytes(convert.mlir_quantize(
            self._ranges(options.calibration), disable_per_channel=not options.per_channel,
            fully_quantize=self._int8_io, input_data_type=io_type, output_data_type=io_type,
            denylisted_ops=list(options.float_ops) or None, denylisted_nodes=list(options.float_nodes) or None)))

    def _ranges(self, calibration: Calibration) -> bytes:
        """The calibrated model whose activation ranges ``calibration`` sets: min-max as calibrated, or clipped by a
        histogram calibrator (:func:`clip_ranges`, computed once per method)."""
        if calibration is Calibration.MINMAX:
            return self._calibrated
        if calibration not in CLIPPING:
            raise ValueError(f"{calibration.value} calibration is not a TFLite converter option "
                             "(the LiteRT Quantizer rung averages ranges over samples)")
        if calibration not in self._clipped:
            self._clipped[calibration] = clip_ranges(self._calibrated, self._calibration, calibration)
        return self._clipped[calibration]

    def _litert(self, options: Int8Options) -> bytes:
        """The LiteRT Quantizer's full-integer recipe on the float32 ``.tflite`` (converted once): static_wi8_ai8,
        or static_wi8_ai16 for 16-bit activations (probed in a child process, as the converter's 16x8 mode is)."""
        if (self._int8_io or options.float_ops or options.float_nodes or not options.per_channel
                or options.calibration is not Calibration.MINMAX):
            raise ValueError("the LiteRT Quantizer rungs run its recipes as they are, with float inputs")
        if self._float is None:
            conv = self._source.converter(Quantization.NONE, self._calibration, int8_io=False)
            self._float = self._signed(bytes(conv.convert()))
        recipe = "static_wi8_ai16" if options.wide_activations else "static_wi8_ai8"
        data = litert_quantize(self._float, self._calibration[:LITERT_CALIBRATION_SAMPLES], recipe)
        failure = probe_artifact(data, self._calibration[:1]) if options.wide_activations else None
        if failure is not None:
            raise ValueError(f"the {recipe} artifact cannot run: {failure}")
        return data

    def _int16x8(self, options: Int8Options) -> bytes:
        """The converter's 16x8 mode (int16 activations, int8 weights), converted and calibrated anew: the int8
        calibration's asymmetric ranges do not serve it (its kernels take symmetric int16 activations)."""
        if self._int8_io:
            raise ValueError("16-bit activations cannot keep int8 inputs and outputs")
        if options.float_ops or options.float_nodes:
            raise ValueError("the 16x8 mode keeps no op in float")
        tf = _tf.tf()
        conv = self._source.converter(Quantization.INT8, self._calibration, int8_io=False)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        conv._experimental_disable_per_channel = not options.per_channel  # noqa: SLF001 (the converter's switch)
        data = self._signed(bytes(conv.convert()))
        failure = probe_artifact(data, self._calibration[:1])  # LiteRT aborts on some 16x8 graphs (a transformer's)
        if failure is not None:
            raise ValueError(f"the 16x8 artifact cannot run: {failure}")
        return data

    def accuracy_controlled(self, control: AccuracyControl, base: Int8Options) -> list[tuple[str, Int8Options]]:
        """The greedy search's rung: ``base`` (converter options) with the nodes
        :func:`~edgekit.export.accuracy_control.greedy_float_nodes` keeps float, as the debugger's denylisted
        nodes. Candidates: each op with its producers, the error ranking's first (:meth:`sensitive_nodes`), then
        graph order (early layers, where an input-range problem sits), at most
        :data:`~edgekit.export.accuracy_control.MAX_CANDIDATES` (each costs a re-quantization and a run)."""
        from dataclasses import replace

        from edgekit.export.accuracy_control import GREEDY_RUNG, MAX_CANDIDATES, greedy_float_nodes

        try:
            ranked = self.sensitive_nodes(base)
        except Exception:  # noqa: BLE001 (no error ranking on this model: graph order alone)
            ranked = []
        groups = list(dict.fromkeys([*ranked, *node_groups(_ops(self._calibrated)).values()]))[:MAX_CANDIDATES]
        nodes = greedy_float_nodes(lambda names: self._quantized(replace(base, float_nodes=names)), groups,
                                   self._calibrated, control, max_nodes=MAX_FLOAT_NODES)
        return [(GREEDY_RUNG, replace(base, float_nodes=nodes))]

    def runnable_rungs(self) -> list[tuple[str, Int8Options]]:
        """The defaults' int8 artifact does not run in LiteRT (in a child process, :func:`~edgekit.export.verify.probe`:
        it fails to prepare or crashes): keep float each of its op types in turn (graph order) and offer the first
        whose artifact runs, as :data:`~edgekit.export.remedies.RUNNABLE`; none when it runs there, or when no single
        op type does."""
        from device_agents.errors import AgentError
        from edgekit.export.remedies import RUNNABLE
        from edgekit.export.verify import probe

        default = self.quantize(Int8Options())
        try:
            probe(default, self._calibration)
            return []  # it runs in a child: what failed was not one of its kernels
        except AgentError:
            pass
        for op in dict.fromkeys(op for op in tflite_ops(default) if op not in QUANTIZE_OPS):
            options = Int8Options(float_ops=(op,))
            try:
                probe(self.quantize(options), self._calibration)
            except (AgentError, ValueError, RuntimeError):  # it still does not run, or the converter cannot
                continue
            return [(RUNNABLE, options)]
        return []

    def sensitive_nodes(self, options: Int8Options) -> list[tuple[str, ...]]:
        """Op output names of the float graph, those whose quantization with ``options`` adds most to the
        intermediate error first (they name the ops to keep float, as the debugger's denylisted nodes); ranked once
        per options."""
        if options not in self._ranked:
            self._ranked[options] = rank_nodes(_ops(self._calibrated), _relative_errors(
                self._calibrated, self._quantized(options), self._samples))
        return self._ranked[options]


LITERT_CALIBRATION_SAMPLES = 256

CLIPPING: dict[Calibration, dict[str, Any]] = {
    Calibration.ENTROPY: {"method": "entropy", "num_bins": ENTROPY_BINS[0], "num_quantized_bins": ENTROPY_BINS[1],
                          "percentile": 99.999},  # required by the collector; read by its percentile method only
    Calibration.PERCENTILE: {"method": "percentile", "num_bins": 2048, "num_quantized_bins": 128,
                             "percentile": 99.999},
}
"""Calibration -> onnxruntime's ``HistogramCollector`` settings (its ``PercentileCalibrater``'s defaults; the entropy
bins as edgekit's ONNX entropy rung): the same algorithms on the same histograms for both formats."""


def clip_ranges(calibrated: bytes, samples: np.ndarray, calibration: Calibration) -> bytes:
    """``calibrated`` (the converter's calibration-only model: each activation tensor's min and max over the
    calibration samples) with each range narrowed to what onnxruntime's histogram calibrator finds on ``samples``:
    the KL-optimal threshold (entropy) or the 99.999th percentile, so that values a few samples or a few positions
    reach are clipped instead of widening the 8-bit grid of the rest. The TFLite converter has no such option; its
    quantizer (``mlir_quantize``) takes the ranges as they are written. Ranges only narrow and keep 0 (the int8
    grid holds it); the model runs one sample at a time, so memory is one sample's tensors and the histograms.

    >>> data = convert.mlir_quantize(clip_ranges(calibrated, x[:256], Calibration.PERCENTILE))  # doctest: +SKIP
    """
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.export.entropy import fast_histogram_collector

    ranged = _activation_ranges(calibrated)
    settings = CLIPPING[calibration]
    collector = fast_histogram_collector(symmetric=False, scenario="same", **settings)
    bins = settings["num_bins"]
    for name, (low, high) in ranged.items():
        # each histogram spans the tensor's whole calibrated range from the start: fed one sample at a time, the
        # collector would otherwise add bins whenever a sample reaches further (a millionfold for a 1000x outlier)
        # and its KL search would walk them all
        top = np.float32(max(abs(low), abs(high)))
        if top > 0:
            collector.histogram_dict[name] = (np.zeros(bins, np.int64), np.linspace(-top, top, bins + 1,
                                                                                 dtype=np.float32),
                                              np.float32(low), np.float32(high), top)
    interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        for i in range(len(samples)):
            values = _sample_tensors(interpreter, samples[i:i + 1])
            collector.collect({name: values[name].astype(np.float32) for name in collector.histogram_dict
                               if name in values})
        thresholds = collector.compute_collection_result() if collector.histogram_dict else {}
    narrowed = {}
    for name, (low, high) in ranged.items():
        if name in thresholds:
            new_low, new_high = float(thresholds[name][0]), float(thresholds[name][1])
            narrowed[name] = (min(max(new_low, low), 0.0), max(min(new_high, high), 0.0))

    def write(model: Any) -> bool:
        for graph in model.subgraphs:
            for tensor in graph.tensors:
                name = _tensor_name(tensor)
                if name in narrowed and narrowed[name][1] > narrowed[name][0]:
                    tensor.quantization.min, tensor.quantization.max = [narrowed[name][0]], [narrowed[name][1]]
        return bool(narrowed)

    return _rewritten(calibrated, write)


def _activation_ranges(calibrated: bytes) -> dict[str, tuple[float, float]]:
    """Tensor name -> (min, max) of each tensor the converter's calibration recorded one range for."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    ranges = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            q = tensor.quantization
            if q is not None and q.min is not None and q.max is not None and len(q.min) == 1 and len(q.max) == 1:
                ranges[_tensor_name(tensor)] = (float(q.min[0]), float(q.max[0]))
    return ranges


def _tensor_name(tensor: Any) -> str | None:
    """A flatbuffer object-model tensor's name as text (the reader gives bytes)."""
    return tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name


def litert_quantize(float_tflite: bytes, calibration: np.ndarray, recipe_name: str) -> bytes:
    """``float_tflite`` quantized by the LiteRT Quantizer (``ai-edge-quantizer``) with its recipe ``recipe_name``
    (e.g. ``static_wi8_ai8``), calibrated one sample at a time on ``calibration`` through the ``serving_default``
    signature. The model's inputs and outputs stay float32: the recipe's configuration for the graph's virtual
    INPUT and OUTPUT ops is set to no quantization, so the quantizer puts QUANTIZE / DEQUANTIZE ops behind and
    before them (its full-integer recipes alone give int8 inputs and outputs, which an application feeding float32
    cannot run, as the converter's int8 without ``int8_io`` would not ask it to).

    >>> litert_quantize(float_tflite, x[:200], "static_wi8_ai8")             # doctest: +SKIP
    """
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.utils import tfl_interpreter_utils

    key = tfl_interpreter_utils.DEFAULT_SIGNATURE_KEY
    inputs = Interpreter(model_content=float_tflite).get_signature_list()[key]["inputs"]
    recipes = recipe_manager.RecipeManager()
    recipes.load_quantization_recipe(getattr(recipe, recipe_name)())
    for end in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
        recipes.add_quantization_config(regex=".*", operation_name=end, algorithm_key=AlgorithmName.NO_QUANTIZE)
    qt = quantizer.Quantizer(bytes(float_tflite), recipes.get_quantization_recipe())
    result = None
    if qt.need_calibration:
        samples = [{inputs[0]: calibration[i:i + 1]} for i in range(len(calibration))]
        with contextlib.redirect_stderr(io.StringIO()):  # its own tqdm bar, across edgekit's progress bars
            result = qt.calibrate({key: samples})
    return bytes(qt.quantize(result, enable_progress_report=False).quantized_model)


QUANTIZE_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


def speed_rungs(data: bytes) -> list[tuple[str, dict[str, object]]]:
    """Keep float the op types XNNPACK leaves out of the int8 graph ``data`` (e.g. int8 AVERAGE_POOL_2D): each runs
    in TFLite's own kernels between two delegate partitions, and a model with many of them (NASNet: 40) runs
    slower in int8 than in float."""
    ops = undelegated_ops(data)
    return [(FLOAT_OPS, {"float_ops": ops})] if ops else []


def undelegated_ops(data: bytes) -> tuple[str, ...]:
    """The op types of a quantized ``.tflite`` that LiteRT's default delegate (XNNPACK) leaves to TFLite's own
    kernels, sorted (quantize/dequantize at the edges of float islands not counted).

    The interpreter lists the model's own nodes and then one DELEGATE node per partition; a partition covers the
    nodes between its inputs and its outputs, and a node no partition covers runs outside the delegate."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=1)
    interpreter.allocate_tensors()
    details = interpreter._get_ops_details()  # noqa: SLF001 (no public API)
    nodes = [op for op in details if op["op_name"] != "DELEGATE"]
    producer = {int(t): op["index"] for op in nodes for t in op["outputs"]}
    by_index = {op["index"]: op for op in nodes}
    covered: set[int] = set()
    for partition in (op for op in details if op["op_name"] == "DELEGATE"):
        boundary = {int(t) for t in partition["inputs"]}
        todo = [int(t) for t in partition["outputs"]]
        while todo:
            node = producer.get(todo.pop())
            if node is None or node in covered:
                continue
            covered.add(node)
            todo.extend(int(t) for t in by_index[node]["inputs"] if int(t) >= 0 and int(t) not in boundary)
    left = {op["op_name"] for op in nodes if op["index"] not in covered}
    return tuple(sorted(left - QUANTIZE_OPS))


def _ops(data: bytes) -> list[tuple[str, list[str], list[str]]]:
    """(name, input tensor names, output tensor names) of each op; an op is named by its first output."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    ops = []
    for op in interpreter._get_ops_details():  # noqa: SLF001 (no public API)
        outputs = [names[i] for i in op["outputs"] if i >= 0]
        if outputs:
            ops.append((outputs[0], [names[i] for i in op["inputs"] if i >= 0], outputs))
    return ops


def _relative_errors(reference: bytes, quantized: bytes, samples: np.ndarray) -> dict[str, float]:
    """Tensor name -> relative L2 error of ``quantized``'s tensor against ``reference``'s over ``samples``, the
    two models run side by side one sample at a time (memory: one sample's tensors, whatever the model)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.export.verify import probe

    probe(quantized, samples)  # in a child first: LiteRT aborts on some int8 graphs
    runs = [Interpreter(model_content=data, experimental_preserve_all_tensors=True) for data in (reference, quantized)]
    for interpreter in runs:
        interpreter.allocate_tensors()
    sums = ErrorSums()
    for i in range(len(samples)):
        ref, quant = (_sample_tensors(interpreter, samples[i:i + 1]) for interpreter in runs)
        for name, value in ref.items():
            if name in quant:
                sums.add(name, quant[name], value)
    return sums.errors()


def _sample_tensors(interpreter: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every float or dequantized tensor of ``interpreter`` after running one sample ``x``, by name."""
    detail = interpreter.get_input_details()[0]
    if detail["dtype"] == np.int8:
        scale, zero = detail["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127)
    interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))
    interpreter.invoke()
    values = {}
    for t in interpreter.get_tensor_details():
        try:
            value = interpreter.get_tensor(t["index"])
        except ValueError:
            continue
        scale, zero = t["quantization"]
        if value.dtype in (np.int8, np.uint8, np.int16) and scale:
            values[t["name"]] = (value.astype(np.float32) - zero) * scale
        elif np.issubdtype(value.dtype, np.floating):
            values[t["name"]] = np.array(value, np.float32)
    return values


def _loop_failure(model: Any) -> str | None:
    """What a converter's TensorList error means, naming the recurrent layers it comes from (``None`` when the model
    names none): a loop over the sequence that edgekit could not unroll."""
    from edgekit.loading.layers import iter_layers

    if hasattr(model, "layers"):
        named = [f"'{layer.name}' ({type(layer).__name__})" for layer in iter_layers(model)
                 if any(kind in type(layer).__name__ for kind in ("LSTM", "GRU", "RNN"))]
    else:
        named = [f"'{name}'" for name in _layer_names(model) if any(kind in name.lower()
                                                                    for kind in ("lstm", "gru", "rnn"))]
    if not named:
        return None
    return (f"layer {', '.join(dict.fromkeys(named))} loops over the sequence with TensorList ops, which have no "
            "TFLite builtin kernel (Flex ops are not on devices); edgekit unrolls the LSTM, GRU and SimpleRNN layers "
            "of a model it rebuilds in tf-keras when the sequence length is fixed, not this one")


def _layer_names(model: Any) -> tuple[str, ...]:
    """The layer names of a tf-keras model or of the Keras model a graph was exported from."""
    if hasattr(model, "layer_names"):
        return model.layer_names
    return tuple(layer.name for layer in model.submodules if hasattr(layer, "name"))


def _failure(exc: BaseException, quantization: Quantization, names: tuple[str, ...]) -> ConversionError:
    """The converter's failure as one line: the op and layer without a builtin kernel when it names one."""
    missing = unsupported_op(str(exc), layer_names=names)
    return ConversionError(f"TFLite conversion ({quantization.value}) failed: "
                           f"{missing or first_line(exc, prefer='error:')}")


def unsupported_op(message: str, *, layer_names: tuple[str, ...] = ()) -> str | None:
    """"op X (layer 'L') has no TFLite builtin kernel" from a converter error, or ``None`` when it names no op.

    The converter reports the op's graph node (``model/layer/.../Op``); the layer is the first scope that names
    one of ``layer_names`` (TensorFlow may have suffixed the scope with ``_1`` when it traced the layer again).
    """
    import re

    found = re.search(r'fused\["(\w+):", "([^"@]+)@', message)
    if found is None:
        named = re.search(r"'tf\.(\w+)' op is neither a custom op nor a flex op", message)
        return f"op {named.group(1)} has no TFLite builtin kernel (Flex ops are not on devices)" if named else None
    op, node = found.groups()
    parts = node.split("/")
    known = set(layer_names)
    layer = next((name for part in parts[1:-1] for name in (part, re.sub(r"_\d+$", "", part)) if name in known),
                 "/".join(parts[1:-1]))
    where = f"layer '{layer}'" if len(parts) > 2 else f"node '{node}', outside any layer"
    return f"op {op} ({where}) has no TFLite builtin kernel (Flex ops are not on devices)"


def _unrolled(model: Any) -> Any | None:
    """A copy of ``model`` with its recurrent layers unrolled (same weights), or ``None`` when the sequence
    length is not fixed (unrolling needs it)."""
    shape = model.inputs[0].shape
    if len(shape) < 2 or shape[1] is None:
        return None
    from edgekit.loading.models import copy_model

    def unroll(layer: Any) -> Any:
        config = layer.get_config()
        if layer.__class__.__name__ in _RECURRENT:
            config["unroll"] = True
        for key in ("layer", "backward_layer"):  # Bidirectional's inner layers
            inner = config.get(key)
            if isinstance(inner, dict) and inner.get("class_name") in _RECURRENT:
                config[key] = {**inner, "config": {**inner["config"], "unroll": True}}
        return layer.__class__.from_config(config)

    try:
        return copy_model(model, clone_function=unroll)
    except (ValueError, TypeError):
        return None


_RECURRENT = ("LSTM", "GRU", "SimpleRNN")


def _static_group_norms(model: Any) -> Any:
    """``model``, or a copy (same weights) whose ``GroupNormalization`` layers compute their moments without a mask.

    tf-keras's layer weighs its moments by a mask of ones shaped like its input (``tf.ones_like``): with a free batch
    dimension the converter leaves a ``BROADCAST_TO`` of a runtime shape, which LiteRT refuses to prepare ("Output
    shape must be broadcastable from input shape"), so no ``.tflite`` was written for any model with the layer. The
    unweighted moments are the same numbers and convert to plain ops (``SUM``, ``RSQRT``, ``MUL``...)."""
    if not any(layer.__class__.__name__ == "GroupNormalization" for layer in model.layers):
        return model
    from edgekit.loading.models import copy_model

    keras = _tf.keras()
    static = _static_group_norm_class()

    def swap(layer: Any) -> Any:
        if layer.__class__ is keras.layers.GroupNormalization:
            return static.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    try:
        return copy_model(model, clone_function=swap)
    except (ValueError, TypeError):
        return model


@functools.cache
def _static_group_norm_class() -> type:
    tf, keras = _tf.tf(), _tf.keras()

    class StaticGroupNormalization(keras.layers.GroupNormalization):  # type: ignore[misc,name-defined]
        """tf-keras's GroupNormalization without its all-ones mask (the moments of every element, unweighted)."""

        def call(self, inputs: Any, mask: Any = None) -> Any:
            if mask is not None:
                return super().call(inputs, mask=mask)
            input_shape = tf.shape(inputs)
            grouped = self._reshape_into_groups(inputs)
            axes = list(range(1, grouped.shape.rank))
            axes.pop(self.axis - 1)  # the groups' axis, as the layer's own _apply_normalization drops it
            mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
            gamma, beta = self._get_reshaped_weights(input_shape)
            normalized = tf.nn.batch_normalization(grouped, mean=mean, variance=variance, scale=gamma, offset=beta,
                                                   variance_epsilon=self.epsilon)
            return tf.reshape(normalized, input_shape)

    return StaticGroupNormalization


def has_recurrent_layer(model: Any) -> bool:
    from edgekit.loading.layers import iter_layers

    return any(layer.__class__.__name__ in (*_RECURRENT, "RNN", "Bidirectional") for layer in iter_layers(model))


def _representative(samples: np.ndarray):  # noqa: ANN202
    def gen():  # noqa: ANN202
        for i in range(len(samples)):
            yield [samples[i:i + 1]]

    return gen


def tflite_ops(data: bytes) -> list[str]:
    """Operator names of a TFLite flatbuffer, in graph order (via the LiteRT interpreter)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    return [op["op_name"] for op in interpreter._get_ops_details()]  # noqa: SLF001 (no public API)


def tflite_signatures(data: bytes) -> dict[str, dict[str, list[str]]]:
    """Signature name -> its input and output names (a trainable artifact has four)."""
    from ai_edge_litert.interpreter import Interpreter

    return {name: {"inputs": list(spec["inputs"]), "outputs": list(spec["outputs"])}
            for name, spec in Interpreter(model_content=data).get_signature_list().items()}
