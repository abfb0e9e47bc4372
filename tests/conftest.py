"""Shared fixtures: small real models on digits, built once per session, in every saved format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

ROOT = Path(__file__).resolve().parents[1]


def _x86_without_vnni() -> bool:
    """An x86 CPU with AVX2 and no VNNI: onnxruntime's U8S8 int8 kernels (vpmaddubsw) saturate at int16 there,
    which is what edgekit's reduce-range rung is for (onnxruntime's own remedy on that CPU class)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    return "avx2" in words and not words & {"avx512_vnni", "avx_vnni"}


X86_WITHOUT_VNNI = _x86_without_vnni()
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits():
    from edgekit.loading.data import load_digits

    return load_digits()


def shared(tmp_path_factory, name: str, build) -> Path:
    """``build(path)`` once for the whole run, read by every pytest-xdist worker: each worker would otherwise train
    and compress the same models again (four workers on two cores). The first worker to ask builds it under a
    lock; a build that failed midway is redone. Tests read these and never change them (copy first)."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    folder = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared"
    folder.mkdir(exist_ok=True)
    target, done = folder / name, folder / f".{name}.done"
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if target.is_dir():
                shutil.rmtree(target)
            target.unlink(missing_ok=True)
            build(target)
            done.touch()
    return target


FIRST = ("federated", "fleet")
"""xdist groups scheduled first, longest first: Flower simulations and a real fleet, minutes of waiting on processes
and rounds each, run one after another in their group; started last, they were the run's tail (and started together,
all such groups slowed each other: the other workers start with compressions)."""


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        group = item.get_closest_marker("xdist_group")
        name = str(group.args[0]) if group and group.args else ""
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


def tiny_cnn(seed: int = 0):
    """The test CNN, its initial weights seeded (the suite is reproducible run to run)."""
    from edgekit import _tf

    _tf.set_seed(seed)
    keras = _tf.keras()
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv2d"),
        layers.BatchNormalization(name="batch_normalization"), layers.ReLU(name="re_lu"),
        layers.MaxPooling2D(name="max_pooling2d"),
        layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2d_1"),
        layers.Flatten(name="flatten"),
        layers.Dense(32, activation="relu", name="dense"),
        layers.Dense(10, activation="softmax", name="dense_1"),
    ], name="tiny_cnn")


@pytest.fixture(scope="session")
def fl_model(digits, tmp_path_factory):
    """The test CNN trained briefly on 300 samples: federated rounds have room to improve it."""
    from edgekit.loading import zoo

    def build(path):
        zoo.train(tiny_cnn(), digits.take(np.arange(300)), epochs=2, learning_rate=1e-3).save(path)

    return shared(tmp_path_factory, "start.keras", build)


@pytest.fixture(scope="session")
def cnn_path(digits, tmp_path_factory) -> Path:
    """A trained tf-keras CNN (about 97% on digits), saved."""
    from edgekit.loading import zoo

    return shared(tmp_path_factory, "cnn.keras",
                  lambda path: zoo.train(tiny_cnn(), digits, epochs=8, seed=0).save(path))


@pytest.fixture(scope="session")
def cnn(cnn_path):
    """The trained tf-keras CNN of :func:`cnn_path`."""
    from edgekit import _tf

    return _tf.keras().models.load_model(cnn_path)


@pytest.fixture(scope="session")
def keras3_path(digits, tmp_path_factory) -> Path:
    """A trained Keras 3 functional model (residual Add, BN, DepthwiseConv2D, ReLU6, GAP)."""
    return shared(tmp_path_factory, "k3.keras", lambda path: _keras3_model(digits).save(path))


def _keras3_model(digits):
    from edgekit import _tf

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(max_value=6.0)(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.1)(x)
    out = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inp, out)
    model.compile("adam", "sparse_categorical_crossentropy")
    keras.utils.set_random_seed(0)
    model.fit(digits.x, digits.y, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def text_npz(tmp_path_factory) -> Path:
    """Token-id sequences whose class is the most frequent token band (learnable quickly)."""
    from edgekit.loading import zoo

    def build(path):
        data = zoo.token_dataset()
        with open(path, "wb") as out:
            np.savez(out, x=data.x, y=data.y)

    return shared(tmp_path_factory, "text.npz", build)


@pytest.fixture(scope="session")
def text_model_path(text_npz, tmp_path_factory) -> Path:
    """A Keras 3 Embedding/Conv1D/LSTM/GlobalAveragePooling1D text classifier on integer tokens."""
    return shared(tmp_path_factory, "text.keras", lambda path: _text_model(text_npz).save(path))


def _text_model(text_npz):
    from edgekit import _tf

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    data = np.load(text_npz)
    model = keras.Sequential([
        keras.Input((16,), dtype="int32"), keras.layers.Embedding(30, 8),
        keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
        keras.layers.LSTM(16, return_sequences=True), keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    keras.utils.set_random_seed(0)
    model.fit(data["x"], data["y"], epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def int8_out(cnn_path, tmp_path_factory) -> Path:
    """The test CNN compressed to int8 (int8 I/O) in both formats: an edgekit output folder."""
    from edgekit import CompressConfig, Recipe, compress

    return shared(tmp_path_factory, "int8", lambda out: compress(
        cnn_path, "digits", out, progress=False,
        config=CompressConfig(recipe=Recipe(quantize="int8"), int8_io=True, training=fast_training())))


@pytest.fixture(scope="session")
def float_out(cnn_path, tmp_path_factory) -> Path:
    """The test CNN exported as float32 in both formats."""
    from edgekit import CompressConfig, Recipe, compress

    return shared(tmp_path_factory, "float", lambda out: compress(
        cnn_path, "digits", out, progress=False,
        config=CompressConfig(recipe=Recipe(quantize="none"), training=fast_training())))


def run_cli(*args: str, tool: str = "edgekit", timeout: int = 600, env: dict | None = None):
    """Run a console script in a subprocess, in the environment a user's shell has (no TF_USE_LEGACY_KERAS: this
    process set it when it imported edgekit); return the CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"} | (env or {})
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT)


def assert_one_line_error(proc, code, *fragments):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def fast_training(**overrides):
    from edgekit import TrainingConfig

    values = {"finetune_epochs": 2, "distill_epochs": 4, "batch_size": 32, "prune_min_steps": 0}
    values.update(overrides)
    return TrainingConfig(**values)


def quiet(*_):
    """A log callback that drops every line."""


def peak_rss_mib(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` from a fresh Python whose only child it is; (the process, its peak RSS in MiB)."""
    import json

    probe = ("import json, resource, subprocess, sys; p = subprocess.run(json.loads(sys.argv[1]), capture_output=True, "
             "text=True); print(json.dumps([p.returncode, p.stdout, p.stderr, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(command)], capture_output=True, text=True,
                         timeout=600, env=env)
    code, stdout, stderr, peak = json.loads(out.stdout)
    return subprocess.CompletedProcess(command, code, stdout, stderr), peak


def train_reply(value: float, examples: int, node: int):
    """A device's train reply as Flower delivers it: one tensor ``w`` of three ``value``s, ``examples`` claimed."""
    import time

    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"q{node}", group_id="1", created_at=time.time(), ttl=60.0,
                        message_type="train")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, metadata=metadata)


def float_release(model, folder: Path) -> Path:
    """A valid float TFLite inference folder of the Keras ``model``: its ``model.tflite`` and ``manifest.json``."""
    import json

    from edgekit import _tf
    from edgekit.artifacts.manifest import file_entry

    data = _tf.tf().lite.TFLiteConverter.from_keras_model(model).convert()
    folder.mkdir()
    (folder / "model.tflite").write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "inference",
                                                      "artifacts": [file_entry("model.tflite", data, fmt="tflite")]}))
    return folder


def nan_on_negative_release(folder: Path) -> Path:
    """A float release (8x8x1 in, 10 scores out) whose scores are NaN when any input pixel is negative (sqrt of the
    pixels, then Dense): healthy on digits, broken on traffic with a negative pixel."""
    from edgekit import _tf

    tf, keras = _tf.tf(), _tf.keras()
    return float_release(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Lambda(tf.math.sqrt),
                                           keras.layers.Flatten(), keras.layers.Dense(10)]), folder)
