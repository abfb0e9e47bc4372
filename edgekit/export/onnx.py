"""ONNX export with tf2onnx (opset 17, explicit input signature) and onnxruntime quantization."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import first_line
from edgekit import _tf
from edgekit.config import Quantization
from edgekit.errors import ConversionError

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
    from edgekit.loading.graph import SavedModelGraph

    tf = _tf.tf()
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # its optimizer logs tracebacks it recovers from
    try:
        if isinstance(model, SavedModelGraph):  # the serving graph, frozen as tf2onnx's --saved-model does
            from tf2onnx import tf_loader

            graph_def, inputs, outputs = tf_loader.from_saved_model(
                str(model.path), None, None, tag="serve", signatures=["serving_default"])[:3]
            proto, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs,
                                                      opset=OPSET, tensors_to_rename={inputs[0]: INPUT_NAME})
        else:
            spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype, name=INPUT_NAME)]
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    except Exception as exc:
        raise ConversionError(f"tf2onnx conversion failed: {first_line(exc)}") from None
    notes: list[str] = []
    if quantization is Quantization.QAT:
        proto, left_float = int8_weights(proto)
        if left_float:
            notes.append(f"weights left float (not on an int8 grid): {', '.join(left_float)}")
        return proto.SerializeToString(), notes
    if quantization is Quantization.NONE:
        return proto.SerializeToString(), notes
    if quantization is Quantization.FLOAT16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(proto, keep_io_types=True).SerializeToString(), notes
    with tempfile.TemporaryDirectory(prefix="edgekit-onnx-") as tmp:
        src, pre, out = Path(tmp, "float.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "quant.onnx")
        src.write_bytes(proto.SerializeToString())
        try:
            if quantization is Quantization.DYNAMIC:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True)
            else:  # INT8, and QAT (given the float twin holding the QAT-tuned weights)
                _quantize_static(src, pre, out, calibration)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"onnxruntime {quantization.value} quantization failed: {first_line(exc)}") from None
        return out.read_bytes(), notes


def _quantize_static(src: Path, pre: Path, out: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


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
