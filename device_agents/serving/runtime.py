"""One inference API over LiteRT, tflite-runtime and onnxruntime; never TensorFlow.

>>> from device_agents import Model
>>> model = Model.load("out/model.tflite")              # doctest: +SKIP
>>> model.predict(x).shape                               # doctest: +SKIP
(32, 10)

Inputs and outputs are float32 at this API even when the model is int8: inputs are quantized
and outputs dequantized with the scale and zero point stored in the model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import ArtifactError, InputMismatchError, first_line


class Runtime(str, Enum):
    """The interpreters the agent can run an artifact with."""

    LITERT = "litert"
    TFLITE_RUNTIME = "tflite-runtime"
    ONNXRUNTIME = "onnxruntime"


class ArtifactFormat(str, Enum):
    TFLITE = "tflite"
    ONNX = "onnx"


_RUNTIME_MODULE = {Runtime.LITERT: "ai_edge_litert", Runtime.TFLITE_RUNTIME: "tflite_runtime",
                   Runtime.ONNXRUNTIME: "onnxruntime"}
_PREFERENCE = {ArtifactFormat.TFLITE: (Runtime.LITERT, Runtime.TFLITE_RUNTIME),
               ArtifactFormat.ONNX: (Runtime.ONNXRUNTIME,)}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, shape (-1 for a free dimension), dtype and quantization."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def detect_format(data: bytes) -> ArtifactFormat:
    """Tell a TFLite flatbuffer from an ONNX protobuf by their first bytes."""
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return ArtifactFormat.TFLITE
    if len(data) >= 2 and data[0] == 0x08:  # ONNX ModelProto starts with field 1 (ir_version), varint
        return ArtifactFormat.ONNX
    raise ArtifactError("the artifact is neither a TFLite flatbuffer nor an ONNX model (corrupt or wrong file)")


def _read_artifact(path: Path) -> bytes:
    """An artifact file's bytes: its size and its format (first 8 bytes) are checked before it is read."""
    from device_agents.files import MAX_ARTIFACT_BYTES, UnsafeFileError, read_bounded

    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist")
    with open(path, "rb") as handle:
        detect_format(handle.read(8))
    try:
        return read_bounded(path, max_bytes=MAX_ARTIFACT_BYTES, what="model artifact")
    except UnsafeFileError as exc:
        raise ArtifactError(str(exc)) from None


def available_runtimes() -> list[Runtime]:
    """The runtimes importable in this environment, in order of preference."""
    found = []
    for runtime, module in _RUNTIME_MODULE.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(runtime)
        except (ImportError, ValueError):
            pass
    return found


def pick_runtime(fmt: ArtifactFormat, forced: Runtime | str | None = None) -> Runtime:
    """Choose the runtime for ``fmt``: the forced one, else the first installed by preference."""
    allowed = _PREFERENCE[fmt]
    if forced is not None:
        try:
            runtime = Runtime(forced)
        except ValueError:
            raise ArtifactError(
                f"unknown runtime {forced!r}; valid: {', '.join(r.value for r in Runtime)}"
            ) from None
        if runtime not in allowed:
            raise ArtifactError(f"runtime {runtime.value} cannot run {fmt.value} artifacts; "
                                f"use {' or '.join(r.value for r in allowed)}")
        if runtime not in available_runtimes():
            raise ArtifactError(f"runtime {runtime.value} is not installed; install it to run this artifact")
        return runtime
    installed = available_runtimes()
    for runtime in allowed:
        if runtime in installed:
            return runtime
    raise ArtifactError(f"no runtime for {fmt.value} artifacts is installed; install "
                        f"{' or '.join(_RUNTIME_MODULE[r] for r in allowed)}")


class Model:
    """A loaded artifact. Use :meth:`Model.load`; then :meth:`predict`."""

    def __init__(self, backend: _Backend, *, runtime: Runtime, fmt: ArtifactFormat, size: int) -> None:
        self._backend = backend
        self.runtime = runtime
        self.format = fmt
        self.size = size
        spec = backend.inputs[0]
        # checks precomputed once: predict() is on the hot path of every request
        self._rank = len(spec.shape)
        self._sample_shape = tuple(spec.shape[1:])
        self._free_dims = any(d == -1 for d in self._sample_shape)
        self._integer_model = np.issubdtype(np.dtype(spec.dtype), np.integer) and spec.scale is None

    @classmethod
    def load(cls, artifact: str | Path | bytes, *, runtime: Runtime | str | None = None,
             num_threads: int | None = None) -> Model:
        """Load a ``.tflite`` or ``.onnx`` artifact from a path or bytes.

        >>> Model.load(Path("model.tflite").read_bytes(), num_threads=2)   # doctest: +SKIP
        """
        if isinstance(artifact, (str, Path)):
            data = _read_artifact(Path(artifact))
        else:
            data = bytes(artifact)
        fmt = detect_format(data)
        chosen = pick_runtime(fmt, runtime)
        loader = LOADERS[chosen]
        try:
            backend = loader(data, num_threads)
        except ArtifactError:
            raise
        except Exception as exc:  # interpreters raise RuntimeError/ValueError/their own types
            raise ArtifactError(f"{chosen.value} cannot load the artifact: {first_line(exc)}") from None
        return cls(backend, runtime=chosen, fmt=fmt, size=len(data))

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._backend.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._backend.outputs

    def predict(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Run samples ``x`` (shape ``(n, ...)``, or one sample without the batch axis).

        Returns float32 outputs, one row per sample.
        """
        x = np.asarray(x)
        given = x.shape
        single = x.ndim == self._rank - 1
        if single:
            x = x[None]
        if x.ndim != self._rank or (x.shape[1:] != self._sample_shape and not self._shape_fits(x.shape)):
            shape = "(n, " + ", ".join("?" if d == -1 else str(d) for d in self._sample_shape) + ")"
            raise InputMismatchError(f"input has shape {given}, the model expects {shape} "
                                     f"(or one sample of shape {self._sample_shape}); "
                                     f"{reshape_hint(tuple(given[1:] if not single else given), self._sample_shape)}")
        kind = x.dtype.kind
        if self._integer_model:
            self._check_integers(x)
        if kind not in "iufb":
            raise InputMismatchError(f"input has dtype {x.dtype}, the model expects numbers")
        try:
            if len(x) <= batch_size:
                y = self._backend.run(x)
            else:
                y = np.concatenate([self._backend.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        except (RuntimeError, ValueError, TypeError) as exc:  # the interpreter refused the request
            raise InputMismatchError(f"{self.runtime.value} rejected the input: {first_line(exc, limit=200)}") \
                from None
        return y[0] if single else y

    def _check_integers(self, x: np.ndarray) -> None:
        """Refuse what an integer input would silently change: fractions, and values its dtype cannot hold (300 as a
        uint8 pixel, a token id past int32) would be wrapped by the cast."""
        want = np.dtype(self.inputs[0].dtype)
        if x.dtype.kind not in "iub":
            raise InputMismatchError(f"input has dtype {x.dtype}, the model expects integers ({want}: pixels or "
                                     "token ids as the model was trained on them)")
        if not np.can_cast(x.dtype, want) and x.size:
            info, lo, hi = np.iinfo(want), int(x.min()), int(x.max())
            if lo < info.min or hi > info.max:
                raise InputMismatchError(f"input values range over [{lo}, {hi}], outside what the model's {want} "
                                         f"input holds ({info.min}..{info.max})")

    def example_input(self) -> np.ndarray:
        """One all-zero sample of the model's input shape and dtype (free dimensions as 1): a smoke input."""
        spec = self.inputs[0]
        shape = [1, *(d if d > 0 else 1 for d in spec.shape[1:])]
        return np.zeros(shape, np.int64 if self._integer_model else np.float32)

    def _shape_fits(self, shape: tuple[int, ...]) -> bool:
        return self._free_dims and all(w in (-1, g) for w, g in zip(self._sample_shape, shape[1:]))


class _Backend:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def reshape_hint(sample_shape: tuple[int, ...], input_shape: tuple[int | None, ...]) -> str:
    """What to do about samples of the wrong shape: a transpose when they hold the model's dimensions in another
    order (channels last for a channels-first model, as PyTorch exports take), else a reshape or resize.

    >>> reshape_hint((32, 32, 3), (3, 32, 32)).split(": ")[-1]
    'transpose the samples, np.transpose(x, (0, 3, 1, 2))'
    """
    if len(sample_shape) == 3 and all(d is not None and d > 0 for d in input_shape) and \
            sorted(sample_shape) == sorted(input_shape):
        for order in ((2, 0, 1), (1, 2, 0)):
            if tuple(sample_shape[i] for i in order) == tuple(input_shape):
                axes = ", ".join(str(i + 1) for i in order)
                return (f"the same dimensions in another order (channels {'first' if order[0] == 2 else 'last'} in "
                        f"the model): transpose the samples, np.transpose(x, (0, {axes}))")
    return "reshape or resize the samples to the model's input"


def _quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    info = np.iinfo(np.dtype(spec.dtype))
    q = np.round(x.astype(np.float32) / np.float32(spec.scale) + spec.zero_point)
    return np.clip(q, info.min, info.max).astype(spec.dtype)


class _TFLiteBackend(_Backend):
    def __init__(self, interpreter_cls: Any, data: bytes, num_threads: int | None) -> None:
        self._interpreter = interpreter_cls(model_content=data, num_threads=num_threads)
        if not self._interpreter.get_input_details():
            signatures = ", ".join(sorted(self._interpreter.get_signature_list())) or "none"
            raise ArtifactError(f"the artifact has no plain input, only signatures ({signatures}): a trainable "
                                "artifact; load its folder with device_agents.Trainer")
        self._interpreter.allocate_tensors()
        self._in = self._interpreter.get_input_details()[0]
        self._out = self._interpreter.get_output_details()[0]
        self.inputs = [_tflite_spec(d) for d in self._interpreter.get_input_details()]
        self.outputs = [_tflite_spec(d) for d in self._interpreter.get_output_details()]
        self._batch = int(self._in["shape"][0])
        self._resizable = True
        # Fused RNN ops keep their state in variable tensors that persist across invoke() calls;
        # each request is independent, so that state is reset before every invoke.
        ops = {op.get("op_name", "") for op in self._interpreter._get_ops_details()}  # noqa: SLF001
        self._stateful = any("LSTM" in op or "RNN" in op for op in ops)
        self._in_spec, self._out_spec = self.inputs[0], self.outputs[0]
        self._in_index, self._out_index = self._in["index"], self._out["index"]
        self._set, self._invoke, self._get = (self._interpreter.set_tensor, self._interpreter.invoke,
                                              self._interpreter.get_tensor)

    @property
    def interpreter(self) -> Any:
        return self._interpreter

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self._batch:
            if not self._resizable:
                return np.concatenate([self.run(x[i:i + self._batch]) for i in range(0, len(x), self._batch)])
            try:
                self._interpreter.resize_tensor_input(self._in["index"], [len(x), *self._in["shape"][1:]])
                self._interpreter.allocate_tensors()
                self._batch = len(x)
            except (RuntimeError, ValueError):
                self._resizable = False
                self._interpreter.resize_tensor_input(self._in["index"], list(self._in["shape"]))
                self._interpreter.allocate_tensors()
                return self.run(x)
        spec = self._in_spec
        feed = _quantize(x, spec) if spec.scale is not None else x.astype(spec.dtype, copy=False)
        if self._stateful:
            self._interpreter.reset_all_variables()
        self._set(self._in_index, feed)
        self._invoke()
        y = self._get(self._out_index)
        out_spec = self._out_spec
        if out_spec.scale is not None:
            return ((y.astype(np.float32) - out_spec.zero_point) * np.float32(out_spec.scale)).astype(np.float32)
        return y.astype(np.float32, copy=False)


def _tflite_spec(detail: dict) -> TensorSpec:
    shape = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"]).name
    quantized = scale not in (0, 0.0) and np.issubdtype(np.dtype(dtype), np.integer)
    return TensorSpec(detail["name"], shape, dtype,
                      float(scale) if quantized else None, int(zero_point) if quantized else None)


def interpreter_class(runtime: Runtime) -> Any:
    """The ``Interpreter`` class of a TFLite runtime (LiteRT or tflite-runtime), imported on first use."""
    if runtime is Runtime.LITERT:
        from ai_edge_litert.interpreter import Interpreter
    elif runtime is Runtime.TFLITE_RUNTIME:
        from tflite_runtime.interpreter import Interpreter
    else:
        raise ArtifactError(f"runtime {runtime.value} has no TFLite interpreter")
    return Interpreter


def _load_litert(data: bytes, num_threads: int | None) -> _Backend:
    return _TFLiteBackend(interpreter_class(Runtime.LITERT), data, num_threads)


def _load_tflite_runtime(data: bytes, num_threads: int | None) -> _Backend:
    return _TFLiteBackend(interpreter_class(Runtime.TFLITE_RUNTIME), data, num_threads)


_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(double)": "float64"}


class _OnnxBackend(_Backend):
    def __init__(self, data: bytes, num_threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = [_onnx_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_onnx_spec(o) for o in self._session.get_outputs()]
        self._in_name = self.inputs[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        feed = x.astype(self.inputs[0].dtype, copy=False)
        return self._session.run(None, {self._in_name: feed})[0].astype(np.float32, copy=False)


def _onnx_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorSpec(arg.name, shape, _ONNX_DTYPES.get(arg.type, arg.type))


def _load_onnxruntime(data: bytes, num_threads: int | None) -> _Backend:
    return _OnnxBackend(data, num_threads)


LOADERS: dict[Runtime, Callable[[bytes, int | None], _Backend]] = {
    Runtime.LITERT: _load_litert,
    Runtime.TFLITE_RUNTIME: _load_tflite_runtime,
    Runtime.ONNXRUNTIME: _load_onnxruntime,
}
"""Runtime -> loader. Every :class:`Runtime` has one (a test checks it)."""
