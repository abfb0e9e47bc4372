"""The edgekit command as a user runs it: exit codes, one-line errors, no tracebacks, no half-written output."""

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli


def test_compress_then_inspect_then_tamper(cnn_path, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compress", str(cnn_path), "--data", "digits", "--out", str(out), "--prune", "0.5",
                   "--quantize", "int8", "--formats", "tflite", "--epochs", "1", "--prune-min-steps", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "prune50+int8" in proc.stdout and "<- selected" in proc.stdout
    assert f"wrote {out}" in proc.stdout
    assert (out / "model.tflite").is_file() and not (out / "model.onnx").exists()
    listing = run_cli("inspect", str(out))
    assert listing.returncode == 0 and "manifest: ok" in listing.stdout and "CONV_2D" in listing.stdout
    info = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert info["artifacts"][0]["inputs"][0]["dtype"] == "float32"
    data = bytearray((out / "model.tflite").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.tflite").write_bytes(bytes(data))
    tampered = run_cli("inspect", str(out))
    assert tampered.returncode == 1 and "does not match its manifest" in tampered.stdout


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.keras").write_bytes(b"PK\x03\x04 this is not a model")
    np.savez(d / "shape.npz", x=np.zeros((20, 9, 9, 1), np.float32), y=np.zeros(20, int))
    np.savez(d / "labels.npz", x=digits.x[:50], y=np.arange(50))
    nan = digits.x[:50].copy()
    nan[3, 0, 0, 0] = np.nan
    np.savez(d / "nan.npz", x=nan, y=digits.y[:50])
    (d / "afile").write_text("x")
    return d


@pytest.mark.parametrize("case, args, code, fragments", [
    ("missing model", ["{d}/none.keras"], 2, ["does not exist"]),
    ("corrupt model", ["{d}/corrupt.keras"], 2, ["not a valid .keras file"]),
    ("shape mismatch", ["{cnn}", "--data", "{d}/shape.npz"], 2, ["expects (n, 8, 8, 1)"]),
    ("labels out of range", ["{cnn}", "--data", "{d}/labels.npz"], 2, ["labels range over [0, 49]", "10 classes"]),
    ("nan in data", ["{cnn}", "--data", "{d}/nan.npz"], 2, ["NaN/inf", "sample 3"]),
    ("unknown quantize", ["{cnn}", "--quantize", "int4"], 2, ["invalid choice: 'int4'"]),
    ("unknown format", ["{cnn}", "--formats", "tflite,coreml"], 2, ["unknown format 'coreml'"]),
    ("bad sparsity", ["{cnn}", "--prune", "1.5"], 2, ["between 0 and 1"]),
    ("out under a file", ["{cnn}", "--out", "{d}/afile/sub"], 2, ["not writable"]),
    ("missing data file", ["{cnn}", "--data", "{d}/none.npz"], 2, ["does not exist"]),
    ("data folder", ["{cnn}", "--data", "{d}"], 2, ["is a folder; give an .npz file with arrays 'x' and 'y'"]),
    ("bad structured", ["{cnn}", "--structured", "two"], 2, ["'two' is not of the form M:N"]),
    ("negative prune steps", ["{cnn}", "--prune", "0.5", "--prune-min-steps", "-1"], 2,
     ["prune_min_steps must be >= 0, got -1"]),
])
def test_bad_input_gets_one_line_and_nonzero_exit(bad_inputs, cnn_path, tmp_path, case, args, code, fragments):
    out = tmp_path / "out"
    filled = [a.format(d=bad_inputs, cnn=cnn_path) for a in args]
    if "--out" not in filled:
        filled += ["--out", str(out)]
    proc = run_cli("compress", *filled, "--quiet")
    assert_one_line_error(proc, code, *fragments)
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_budget_failure_exit_code_and_kept_report(cnn_path, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("compress", str(cnn_path), "--out", str(out), "--student-width", "0.1", "--quantize", "int8",
                   "--distill-epochs", "1", "--max-accuracy-drop", "0.01", "--formats", "tflite", "--quiet")
    assert proc.returncode == 3, proc.stderr
    assert "no candidate kept the accuracy drop within 0.01 points" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "report.md").is_file() and not (out / "model.tflite").exists()


def test_importing_the_cli_and_library_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, edgekit, edgekit_cli.cli, device_agents; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


CUSTOM_LAYER = '''
import keras


@keras.saving.register_keras_serializable(package="mine")
class Scale(keras.layers.Layer):
    """A user's own layer: a learned per-feature scale."""

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gain
'''


def test_a_custom_layer_loads_when_its_module_is_named_and_only_then(tmp_path, digits, monkeypatch):
    import importlib

    from edgekit import _tf

    (tmp_path / "mine_layers.py").write_text(CUSTOM_LAYER)
    keras = _tf.keras3()  # the user's Keras 3 model, built here (the CLI runs below are the user's shell)
    monkeypatch.syspath_prepend(str(tmp_path))
    mine_layers = importlib.import_module("mine_layers")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), mine_layers.Scale(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x, digits.y, epochs=3, verbose=0)
    model.save(tmp_path / "custom.keras")
    refused = run_cli("compress", str(tmp_path / "custom.keras"), "--out", str(tmp_path / "no"), "--quiet")
    assert_one_line_error(refused, 2, "mine>Scale", "import the module that registers it first")
    assert not (tmp_path / "no").exists()
    proc = run_cli("compress", str(tmp_path / "custom.keras"), "--custom-objects", "mine_layers", "--out",
                   str(tmp_path / "out"), "--quiet", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {a["format"] for a in manifest["artifacts"]} == {"tflite", "onnx"}
    assert all(a["accuracy_drop"] <= 3 for a in manifest["artifacts"]), manifest["artifacts"]
    bad = run_cli("compress", str(tmp_path / "custom.keras"), "--custom-objects", "no_such_module", "--out",
                  str(tmp_path / "bad"), "--quiet")
    assert_one_line_error(bad, 2, "cannot import the custom-objects module 'no_such_module'")


def _subparser(parser, *names):
    import argparse

    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _option(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_the_parsers_choices_and_defaults_come_from_the_library():
    """The CLI restates no option: its choices are the library's enums and registries, its defaults the
    dataclasses' defaults."""
    from edgekit_cli.cli import build_parser

    from edgekit import BatchNorm, CompressConfig, Quantization, SizeMetric, TrainingConfig
    from edgekit.federated.config import LrSchedule, RoundSettings, Strategy
    from edgekit.federated.strategies import STRATEGIES

    parser = build_parser()
    compress = _subparser(parser, "compress")
    assert _option(compress, "--quantize").choices == [q.value for q in Quantization]
    assert _option(compress, "--select-by").choices == [m.value for m in SizeMetric]
    assert _option(compress, "--select-by").default == CompressConfig().select_by.value
    assert _option(compress, "--batchnorm").choices == [b.value for b in BatchNorm]
    assert _option(compress, "--batchnorm").default == TrainingConfig().batchnorm.value
    for command in (("fl", "simulate"), ("fl", "up")):
        fl = _subparser(parser, *command)
        assert sorted(_option(fl, "--strategy").choices) == sorted(s.value for s in STRATEGIES) == sorted(
            s.value for s in Strategy)
        assert _option(fl, "--lr-schedule").default == RoundSettings().lr_schedule.value
        assert _option(fl, "--lr-schedule").choices == [s.value for s in LrSchedule]


def test_the_version_is_the_installed_distributions():
    from importlib.metadata import version

    from edgekit._version import DISTRIBUTION, __version__

    assert __version__ == version(DISTRIBUTION) != "0.0.0+local"
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgekit {__version__}"
