"""ONNX export with tf2onnx (opset 17, explicit input signature) and onnxruntime quantization."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import _tf
from edgekit.config import Quantization
from edgekit.errors import ConversionError

OPSET = 17
INPUT_NAME = "input"


def to_onnx(model: Any, *, quantization: Quantization, calibration: np.ndarray) -> tuple[bytes, list[str]]:
    """Convert a tf-keras model to ONNX and quantize it as asked.

    int8: onnxruntime's static QDQ quantization, per channel, calibrated on ``calibration``
    (after ``quant_pre_process``). QAT: ``model`` is the float twin of the QAT model (see
    :func:`edgekit.compress.qat.float_twin`), quantized the same way: tf2onnx would keep the weights
    float32, folding their fake-quant into constants.
    dynamic: int8 weights. float16: onnxruntime's float16 converter, float32 I/O kept.
    """
    tf = _tf.tf()
    import tf2onnx

    spec = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype, name=INPUT_NAME)]
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    except Exception as exc:
        raise ConversionError(f"tf2onnx conversion failed: {str(exc).splitlines()[0][:300]}") from None
    notes: list[str] = []
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
            raise ConversionError(
                f"onnxruntime {quantization.value} quantization failed: {str(exc).splitlines()[0][:300]}"
            ) from None
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

