"""Every compression technique end to end: real tfmot, real converters, real runtimes."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from conftest import fast_training

from device_agents import Model
from edgekit import BudgetError, CompressConfig, ConversionError, Recipe, compress
from edgekit.config import Format, Quantization
from edgekit.errors import InputError, OutputError
from edgekit.export import EXPORTERS, exporter
from edgekit.export.tflite import tflite_ops
from edgekit.optimize.prune import prune


def config(**kw):
    kw.setdefault("training", fast_training())
    return CompressConfig(**kw)


def artifact(result, fmt):
    return next(a for a in result.selected.artifacts if a.format.value == fmt)


def test_default_int8_writes_verified_artifacts_and_manifest(cnn_path, tmp_path):
    out = tmp_path / "out"
    result = compress(cnn_path, "digits", out, config=config(), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(cnn_path.read_bytes()).hexdigest()
    assert {"path", "sha256", "accuracy", "params"} <= set(manifest["source"])
    assert manifest["edgekit_version"]
    files = {a["file"]: a for a in manifest["artifacts"]}
    assert set(files) == {"model.tflite", "model.onnx"}
    for name, entry in files.items():
        data = (out / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        assert entry["gzip_bytes"] < entry["bytes"]
        assert entry["quantization"] == "int8"
        assert entry["top1_agreement"] >= 97.0
        assert entry["accuracy"] >= manifest["source"]["accuracy"] - 3.0
        for spec in entry["input"] + entry["output"]:
            assert {"name", "shape", "dtype", "scale", "zero_point"} <= set(spec)
    # int8 applies to every format: the ONNX model is QDQ with int8 weights
    graph = onnx.load(str(out / "model.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    assert "FULLY_CONNECTED" in tflite_ops((out / "model.tflite").read_bytes())
    # converted from the traced inference function, with the signature a Keras model's conversion has
    from edgekit.export.tflite import tflite_signatures

    keras_model = tf_keras_model(cnn_path)
    assert tflite_signatures((out / "model.tflite").read_bytes()) == {"serving_default": {
        "inputs": [keras_model.input_names[0]], "outputs": [keras_model.output_names[0]]}}
    assert (out / "report.md").is_file() and (out / "size_vs_accuracy.png").stat().st_size > 1000
    from edgekit import load_model

    assert load_model(out / "model.keras").params == result.selected.params  # the selected float model
    assert result.selected.artifacts[0].runtime == "litert" and result.selected.artifacts[1].runtime == "onnxruntime"


def tf_keras_model(path):
    from edgekit.loading.models import load_model

    return load_model(path).model


def test_quantized_tflite_artifacts_ship_without_what_no_runtime_reads(cnn, digits, int8_out, float_out):
    """Intermediate tensor names, the description and the converter's CONVERSION_METADATA are dropped; the inputs,
    outputs and signatures keep their names, and the file computes exactly what the converter's own does. The
    float32 artifact keeps its names: the LiteRT Quantizer, which takes it, reads them."""
    from ai_edge_litert.interpreter import Interpreter

    from edgekit import _tf
    from edgekit.export.tflite import compact, tflite_signatures

    tf = _tf.tf()
    raw = bytes(tf.lite.TFLiteConverter.from_keras_model(cnn).convert())
    small = compact(raw)
    assert len(raw) - len(small) > 1000 and b"CONVERSION_METADATA" in raw
    assert tflite_signatures(small) == tflite_signatures(raw)
    x = digits.x[:40]
    assert np.array_equal(Model.load(small).predict(x), Model.load(raw).predict(x))
    for data, kept in ((small, False), ((int8_out / "model.tflite").read_bytes(), False),
                       ((float_out / "model.tflite").read_bytes(), True)):
        interpreter = Interpreter(model_content=data)
        io = {d["name"] for d in (*interpreter.get_input_details(), *interpreter.get_output_details())}
        named = {t["name"] for t in interpreter.get_tensor_details()} - {""}
        assert (named > io) if kept else (named == io and len(interpreter.get_tensor_details()) > len(io) + 5)
        assert (b"CONVERSION_METADATA" in data) == kept


def test_a_models_float_onnx_is_converted_once_and_again_when_its_weights_change(cnn, monkeypatch):
    from edgekit.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "_RECENT", onnx_export._Recent())  # whatever other tests converted before

    calls = []
    convert = onnx_export._float_onnx

    def counted(model):
        calls.append(model)
        return convert(model)

    onnx_export._float_onnx, weights = counted, cnn.get_weights()
    try:
        first, second = onnx_export.float_onnx(cnn), onnx_export.float_onnx(cnn)
        assert len(calls) == 1 and first is not second  # a copy each: callers change their protos
        assert first.SerializeToString() == second.SerializeToString()
        first.graph.node.pop()
        assert onnx_export.float_onnx(cnn).SerializeToString() == second.SerializeToString()
        cnn.set_weights([w + 1 for w in weights])
        changed = onnx_export.float_onnx(cnn)
        assert len(calls) == 2 and changed.SerializeToString() != second.SerializeToString()
    finally:
        onnx_export._float_onnx = convert
        cnn.set_weights(weights)


def test_int8_io_quantizes_model_inputs_and_outputs(cnn_path, digits, tmp_path):
    result = compress(cnn_path, "digits", tmp_path / "o", progress=False,
                      config=config(recipe=Recipe(quantize="int8"), formats="tflite", int8_io=True))
    art = artifact(result, "tflite")
    assert art.inputs[0].dtype == "int8" and art.inputs[0].scale > 0
    assert art.outputs[0].dtype == "int8"
    model = Model.load(art.data)
    # the agent quantizes float inputs and dequantizes outputs: probabilities come back
    probs = model.predict(digits.x[:50])
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1.0, atol=0.05)
    assert art.accuracy >= result.source["accuracy"] - 3.0


def test_float_dynamic_float16_sizes_and_float_agreement(cnn_path, tmp_path):
    recipes = (Recipe(quantize="none"), Recipe(quantize="dynamic"), Recipe(quantize="float16"))
    result = compress(cnn_path, "digits", None, progress=False,
                      config=config(max_accuracy_drop=100, search=recipes))
    by = {c.recipe.quantize: c for c in result.candidates}
    for fmt in (0, 1):
        f32 = by[Quantization.NONE].artifacts[fmt]
        assert f32.max_abs_diff <= 1e-4 and f32.conversion_max_abs_diff <= 1e-4 and f32.top1_agreement == 100.0
        assert by[Quantization.FLOAT16].artifacts[fmt].bytes < 0.6 * f32.bytes
        assert by[Quantization.DYNAMIC].artifacts[fmt].bytes < 0.4 * f32.bytes
        assert by[Quantization.FLOAT16].artifacts[fmt].max_abs_diff < 1e-2


def test_magnitude_pruning_reports_per_layer_sparsity_and_compresses(cnn_path, tmp_path):
    out = tmp_path / "p"
    result = compress(cnn_path, "digits", out, progress=False,
                      config=config(recipe=Recipe(prune=0.75, quantize="none"), formats="tflite",
                                    training=fast_training(finetune_epochs=4)))
    sparsity = result.selected.layer_sparsity
    assert set(sparsity) >= {"conv2d", "dense"}
    for layer, value in sparsity.items():
        assert value == pytest.approx(0.75, abs=0.02), layer
    unpruned = compress(cnn_path, "digits", None, progress=False,
                        config=config(recipe=Recipe(quantize="none"), formats="tflite"))
    assert artifact(result, "tflite").gzip_bytes < 0.5 * artifact(unpruned, "tflite").gzip_bytes
    assert artifact(result, "tflite").accuracy >= result.source["accuracy"] - 5
    assert (out / "sparsity.png").is_file()
    assert "Per-layer sparsity" in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["artifacts"][0]["sparsity"] == pytest.approx(0.75, abs=0.02)


def test_pruning_fine_tunes_at_least_its_minimum_of_steps(cnn, digits):
    """On a small dataset pruning runs more epochs than finetune_epochs, to make prune_min_steps optimizer steps
    (a sparsity ramp over a few dozen steps loses accuracy training would recover); 0 leaves finetune_epochs."""
    from edgekit._progress import Progress
    from edgekit.config import TrainingConfig
    from edgekit.optimize.prune import pruning_epochs

    small = digits.take(np.arange(64))  # 2 steps an epoch at batch 32
    for minimum, epochs in ((0, 1), (9, 5), (2, 1)):
        training = TrainingConfig(finetune_epochs=1, prune_min_steps=minimum)
        assert pruning_epochs(small, training) == epochs
    result = prune(cnn, small, sparsity=0.5, probabilities=True, progress=Progress(enabled=False),
                   training=TrainingConfig(finetune_epochs=1, prune_min_steps=9))
    assert len(result.losses) == 5 and 0.45 <= max(result.per_layer.values()) <= 0.55
    assert TrainingConfig().prune_min_steps == 300
    with pytest.raises(InputError, match="prune_min_steps must be >= 0"):
        TrainingConfig(prune_min_steps=-1)


def test_structured_2_of_4_pattern(cnn, digits):
    from edgekit._progress import QUIET

    result = prune(cnn, digits, structured=(2, 4), training=fast_training(finetune_epochs=1),
                   probabilities=True, progress=QUIET)
    dense = result.model.get_layer("dense").kernel.numpy()  # (in, out): blocks of 4 along the input axis
    blocks = dense.T.reshape(dense.shape[1], -1, 4)
    assert ((blocks == 0).sum(axis=-1) >= 2).all()
    assert result.per_layer["dense"] == pytest.approx(0.5, abs=0.01)


def test_qat_gives_int8_artifacts_in_both_formats(cnn_path, tmp_path):
    result = compress(cnn_path, "digits", tmp_path / "q", progress=False,
                      config=config(recipe=Recipe(quantize="qat")))
    tfl, onx = artifact(result, "tflite"), artifact(result, "onnx")
    assert "QUANTIZE" in tflite_ops(tfl.data)
    graph = onnx.load_from_string(onx.data).graph
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    for art in (tfl, onx):
        assert art.accuracy >= result.source["accuracy"] - 3.0
    # both are the same QAT model: learned activation ranges, the same int8 weights
    assert abs(tfl.accuracy - onx.accuracy) <= 1.0
    assert not any(init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4 for init in graph.initializer)


def test_int8_weights_leaves_off_grid_weights_float(cnn):
    import tf2onnx

    from edgekit import _tf
    from edgekit.export.onnx import int8_weights

    tf = _tf.tf()
    proto, _ = tf2onnx.convert.from_keras(cnn, input_signature=[tf.TensorSpec((None, 8, 8, 1), tf.float32)],
                                          opset=17)
    _, left_float = int8_weights(proto)  # a float model's weights are on no int8 grid
    assert len(left_float) == 4  # 2 convs + 2 dense kernels stay float, none silently rounded


def test_distillation_into_a_thinner_student(cnn_path, tmp_path):
    result = compress(cnn_path, "digits", None, progress=False,
                      config=config(recipe=Recipe(student_width=0.5, quantize="none"), formats="tflite",
                                    training=fast_training(distill_epochs=8)))
    assert result.selected.params < result.source["params"] / 2.5
    assert artifact(result, "tflite").accuracy >= 85.0


def test_distillation_into_a_user_student_file(cnn_path, tmp_path):
    from edgekit import _tf

    keras = _tf.keras()
    student = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(24, activation="relu"), keras.layers.Dense(10)])
    student.save(tmp_path / "student.keras")
    result = compress(cnn_path, "digits", None, progress=False,
                      config=config(recipe=Recipe(student=str(tmp_path / "student.keras"), quantize="int8"),
                                    formats="tflite", training=fast_training(distill_epochs=8)))
    assert result.selected.params == student.count_params()
    assert artifact(result, "tflite").accuracy >= 85.0
    wrong = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5)])
    wrong.save(tmp_path / "wrong.keras")
    with pytest.raises(InputError, match="student has 5 outputs but the teacher has 10 classes"):
        compress(cnn_path, "digits", None, progress=False,
                 config=config(recipe=Recipe(student=str(tmp_path / "wrong.keras"))))


@pytest.mark.slow  # make test: the rule in test_budget.py (test_the_search_keeps_the_smallest_candidate_within_the_
# budget_and_marks_every_one), pruning and distillation below; this end-to-end search took 66-80 s of make test
def test_budget_search_keeps_the_smallest_within_budget(cnn_path, tmp_path):
    recipes = (Recipe(quantize="float16"), Recipe(quantize="int8"), Recipe(prune=0.5, quantize="int8"),
               Recipe(student_width=0.1, quantize="int8"))
    out = tmp_path / "b"
    result = compress(cnn_path, "digits", out, progress=False,
                      config=config(max_accuracy_drop=3.0, search=recipes,
                                    training=fast_training(finetune_epochs=4, distill_epochs=1)))
    within = [c for c in result.candidates if c.within_budget]
    assert result.selected in within
    assert result.selected.size("gzip_bytes") == min(c.size("gzip_bytes") for c in within)
    assert result.selected.recipe.name == "prune50+int8"
    tiny = next(c for c in result.candidates if c.recipe.student_width)  # smaller, but over budget
    assert tiny.within_budget is False and tiny.size("gzip_bytes") < result.selected.size("gzip_bytes")
    report = (out / "report.md").read_text()
    for recipe in recipes:
        assert f"| {recipe.name} | tflite |" in report


@pytest.mark.slow  # through the CLI in make test: tests/cli/test_cli.py::test_budget_failure_exit_code_and_kept_report
def test_budget_not_met_exits_with_report_and_no_artifacts(cnn_path, tmp_path):
    out = tmp_path / "nb"
    with pytest.raises(BudgetError, match=r"no candidate kept the accuracy drop within 0.01 points") as info:
        compress(cnn_path, "digits", out, progress=False,
                 config=config(max_accuracy_drop=0.01, search=(Recipe(student_width=0.1, quantize="int8"),),
                               training=fast_training(distill_epochs=1)))
    assert info.value.exit_code == 3 and info.value.best_drop > 0.01
    assert (out / "report.md").is_file() and "no candidate met the budget" in (out / "report.md").read_text()
    assert not (out / "model.tflite").exists() and not (out / "manifest.json").exists()


def test_failure_midway_leaves_nothing_half_written(cnn_path, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ConversionError("simulated converter failure")

    monkeypatch.setitem(EXPORTERS, Format.ONNX, dataclasses.replace(EXPORTERS[Format.ONNX], convert=broken))
    one = compress(cnn_path, "digits", tmp_path / "one", config=config(), progress=False)
    assert [a.format.value for a in one.selected.artifacts] == ["tflite"]  # the other format is still written
    assert one.selected.format_errors == {"onnx": "simulated converter failure"}
    assert [a["file"] for a in json.loads((tmp_path / "one" / "manifest.json").read_text())["artifacts"]] == \
        ["model.tflite"]
    monkeypatch.setitem(EXPORTERS, Format.TFLITE, dataclasses.replace(EXPORTERS[Format.TFLITE], convert=broken))
    out = tmp_path / "half"
    with pytest.raises(ConversionError, match="simulated"):
        compress(cnn_path, "digits", out, config=config(), progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["one"]


def test_output_folder_rules(cnn_path, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        compress(cnn_path, "digits", tmp_path / "file", config=config(), progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty and edgekit did not write it"):
        compress(cnn_path, "digits", foreign, config=config(), progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_folder_with_a_report_md_that_edgekit_did_not_write_is_never_deleted(cnn_path, tmp_path):
    """Once any folder holding report.md or manifest.json counted as edgekit's: the user's files went too."""
    mine = tmp_path / "project"
    (mine / ".git").mkdir(parents=True)
    (mine / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (mine / "report.md").write_text("my report")
    (mine / "manifest.json").write_text("{}")
    with pytest.raises(OutputError, match="edgekit did not write it"):
        compress(cnn_path, "digits", mine, config=config(), progress=False)
    assert (mine / ".git" / "HEAD").read_text() == "ref: refs/heads/main"
    assert (mine / "report.md").read_text() == "my report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging left either


def test_an_unwritable_output_is_refused_before_any_work(tmp_path):
    from conftest import assert_one_line_error, run_cli

    # as root, os.access says /proc is writable; creating the staging folder is what tells
    proc = run_cli("compress", str(tmp_path / "missing.keras"), "--out", "/proc/edgekit-out", "--quiet")
    assert_one_line_error(proc, 2, "cannot write output folder /proc/edgekit-out")  # not the missing model


def test_a_killed_compress_loses_nothing_and_its_staging_is_cleaned(cnn_path, tmp_path):
    from conftest import run_cli

    out = tmp_path / "out"
    args = ["compress", str(cnn_path), "--out", str(out), "--formats", "tflite", "--quiet", "--quantize"]
    compress(cnn_path, "digits", out, progress=False,  # the output a kill must not lose (written in this process)
             config=config(recipe=Recipe(quantize="float16"), formats=(Format.TFLITE,)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    killed = run_cli(*args, "dynamic", env={"EDGEKIT_CRASH_AT": "output-staged"})
    assert killed.returncode == -9
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old output, whole
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1  # what the kill left
    assert run_cli(*args, "dynamic").returncode == 0
    assert list(tmp_path.glob(".out.*")) == []  # stale staging removed, no second copy
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"][0]["quantization"] == "dynamic" and (out / ".edgekit-output").is_file()


KILLED_LAYERS = """
import keras


@keras.saving.register_keras_serializable(package="edgekit_test_killed")
class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flat = keras.layers.Flatten()
        self.head = keras.layers.Dense(10, activation="softmax")

    def call(self, x):
        return self.head(self.flat(x))
"""


def test_the_work_folders_of_a_killed_run_are_removed_by_the_next_one(digits, tmp_path, monkeypatch):
    """A run killed outright (SIGKILL, the out-of-memory killer) left its work folders under the temporary directory
    (a Keras 3 graph exported for the converters: 400 MB for a ConvNeXt) and nothing ever removed them. They are named
    after their process now (edgekit-KIND-PID-*); the next edgekit process that makes one removes those whose process
    is gone, and no other."""
    import importlib
    import sys
    import tempfile

    from conftest import run_cli

    from edgekit._io import temp_dir

    (tmp_path / "edgekit_test_killed_layers.py").write_text(KILLED_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = importlib.import_module("edgekit_test_killed_layers").Net()
    model(digits.x[:2])
    model.save(tmp_path / "sub.keras")  # subclassed: served by its exported graph, in a work folder
    private = tmp_path / "tmp"  # this test's own temporary directory: no other test's folders in it
    private.mkdir()
    killed = run_cli("compress", str(tmp_path / "sub.keras"), "--custom-objects", "edgekit_test_killed_layers",
                     "--out", str(tmp_path / "out"), "--formats", "tflite", "--quantize", "float16", "--quiet",
                     env={"EDGEKIT_CRASH_AT": "output-staged", "TMPDIR": str(private), "PYTHONPATH": str(tmp_path)})
    assert killed.returncode == -9, killed.stderr
    left = [folder.name for folder in private.iterdir()]
    assert any(name.startswith("edgekit-graph-") for name in left), left  # what the kill left behind
    mine = private / f"edgekit-graph-{os.getpid()}-live"  # a running process's folder
    mine.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    fresh = temp_dir("next")
    assert sorted(f.name for f in private.glob("edgekit-*") if f.is_dir()) == sorted([mine.name, fresh.name])
    del sys.modules["edgekit_test_killed_layers"]


def test_a_terminated_compress_removes_its_staging_and_exits_130(cnn_path, tmp_path):
    """SIGTERM (kill, timeout, a service manager) ended compress at once: its hidden staging folder (28 MB for a
    ConvNeXt) stayed until the next run to the same output, and nothing was said."""
    import signal
    import subprocess
    import time

    from conftest import BIN

    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.Popen([str(BIN / "edgekit"), "compress", str(cnn_path), "--out", str(tmp_path / "out"),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the staging folder never appeared"
    time.sleep(1.0)  # well into the work
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["edgekit: interrupted"]
    assert list(tmp_path.iterdir()) == []  # no staging, no output


def test_an_output_displaced_by_a_kill_between_two_renames_is_put_back(tmp_path):
    import subprocess

    from edgekit._io import check_output_dir, mark_output

    dead = subprocess.Popen(["true"])
    dead.wait()
    old = tmp_path / f".out.old-{dead.pid}"
    old.mkdir()
    mark_output(old, "compress")
    (old / "model.tflite").write_bytes(b"the previous output")
    check_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "model.tflite").read_bytes() == b"the previous output" and not old.exists()


@pytest.mark.slow  # make test: the recurrent int8 test below
def test_text_model_int8_and_dynamic_export(text_model_path, text_npz, tmp_path):
    # 2:4 applies to Dense layers only here (tfmot's m-by-n fails on Conv1D/LSTM/Embedding at training time)
    recipes = (Recipe(quantize="int8"), Recipe(quantize="dynamic"), Recipe(structured=(2, 4), quantize="int8"))
    result = compress(text_model_path, text_npz, None, progress=False,
                      config=config(max_accuracy_drop=100, search=recipes))
    assert result.source["accuracy"] > 80
    for cand in result.candidates:
        assert cand.error is None, cand.error
        for art in cand.artifacts:
            assert art.inputs[0].dtype in ("int32", "int64")
            assert art.accuracy >= result.source["accuracy"] - 5, (cand.recipe.name, art.format)
    structured = result.candidates[2].layer_sparsity  # by layer type: Keras names depend on what ran before
    dense = next(v for k, v in structured.items() if k.startswith("dense"))
    lstm = next(v for k, v in structured.items() if k.startswith("lstm"))
    assert dense == pytest.approx(0.5, abs=0.01) and lstm < 0.1


def test_keras3_model_compresses_like_any_other(keras3_path, tmp_path):
    result = compress(keras3_path, "digits", tmp_path / "k3", progress=False,
                      config=config(recipe=Recipe(quantize="int8")))
    assert result.source["format"] == "keras3" and result.source["rebuild_max_abs_diff"] <= 1e-5
    assert result.source["accuracy"] >= 60
    for art in result.selected.artifacts:  # the explicit int8 recipe's budget; agreement far from a collapse (10%)
        assert art.quantization_drop <= 2.0 and art.top1_agreement >= 90.0, (art.format, art.top1_agreement)


@pytest.mark.parametrize("saved", ["keras3", "savedmodel"])
def test_a_model_with_free_spatial_dims_exports_at_the_datas_shape(digits, tmp_path, saved):
    """A fully convolutional model, input (None, None, 1): the converter kept the dimensions free, LiteRT allocated
    them as 1x1 and could not prepare the convolution ("XNNPack delegate failed to reshape runtime"), so no .tflite
    was written, and the trainable export crashed (TypeError, exit 70). The artifacts take the data's shape now,
    and the user hears it."""
    from edgekit import TrainableConfig, _tf, export_trainable

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])
    path = tmp_path / ("fcn.keras" if saved == "keras3" else "fcn")
    model.save(path) if saved == "keras3" else model.export(str(path), verbose=False)
    result = compress(path, "digits", tmp_path / "out", progress=False, config=config(recipe=Recipe(quantize="none")))
    assert not result.selected.format_errors, result.selected.format_errors
    said = "the model's input (n, ?, ?, 1) has free dimensions: the artifacts take (n, 8, 8, 1)"
    assert any(line.startswith(said) for line in result.warnings), result.warnings
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["input"]["shape"] == [None, None, None, 1]
    for art in result.selected.artifacts:
        assert [spec.shape for spec in art.inputs] == [(-1, 8, 8, 1)], art.format
        written = Model.load((tmp_path / "out" / art.filename).read_bytes())
        np.testing.assert_allclose(written.predict(digits.x[:7]), model(digits.x[:7]).numpy(), atol=1e-5)
    trained = export_trainable(path, tmp_path / "t", data="digits", progress=False,
                               config=TrainableConfig(head_only=saved == "savedmodel"))  # a graph trains its head
    assert trained.manifest["trainable"]["input"]["shape"] == [None, 8, 8, 1]
    assert any(line.startswith(said) for line in trained.warnings), trained.warnings
    assert trained.manifest["verification"]["train_step_max_abs_diff"] <= 1e-5
    np.savez(tmp_path / "other.npz", x=np.zeros((20, 12, 12, 1), np.float32), y=np.zeros(20, np.int64))
    with pytest.raises(InputError, match=r"other.npz: x has shape \(20, 12, 12, 1\), but the model's free input "
                                         r"\(n, \?, \?, 1\) was fixed to \(n, 8, 8, 1\) by the data's samples"):
        compress(path, "digits", None, eval_data=tmp_path / "other.npz", progress=False, config=config())


def test_labels_are_optional(cnn_path, digits, tmp_path):
    np.savez(tmp_path / "nolabels.npz", x=digits.x)
    result = compress(cnn_path, tmp_path / "nolabels.npz", None, progress=False, config=config(formats="tflite"))
    assert result.data_info["labels"].startswith("source model predictions")
    assert result.source["accuracy"] == 100.0
    assert artifact(result, "tflite").accuracy == artifact(result, "tflite").top1_agreement


def test_a_keras_datasets_style_file_is_its_train_split_evaluated_on_its_test_split(cnn_path, digits, tmp_path):
    """keras.datasets splits data as x_train/y_train/x_test/y_test (Keras's own mnist.npz): such a file was refused
    ("has no array 'x'"). Its train split is the data and its test split, whole, is what accuracy is measured on;
    given as the evaluation data, its test split is evaluated on."""
    np.savez(tmp_path / "splits.npz", x_train=digits.x[:1500], y_train=digits.y[:1500], x_test=digits.x[1500:],
             y_test=digits.y[1500:])
    result = compress(cnn_path, tmp_path / "splits.npz", tmp_path / "out", progress=False,
                      config=config(formats="tflite"))
    assert result.data_info["samples"] == 1500 and result.data_info["evaluation"] == len(digits) - 1500
    assert result.data_info["evaluation_data"] == f"{tmp_path / 'splits.npz'} (x_test)"
    assert f"evaluation {len(digits) - 1500} ({tmp_path / 'splits.npz'} (x_test))" in (
        tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["data"]["evaluation"] == len(digits) - 1500
    expected = 100 * float(np.mean(tf_keras_model(cnn_path).predict(digits.x[1500:], verbose=0).argmax(1)
                                   == digits.y[1500:]))
    assert result.source["accuracy"] == pytest.approx(expected, abs=1e-6)
    result = compress(cnn_path, "digits", None, eval_data=tmp_path / "splits.npz", progress=False,
                      config=config(formats="tflite"))
    assert result.data_info["evaluation"] == len(digits) - 1500 and result.data_info["samples"] == len(digits)


def test_a_model_that_gives_one_class_for_every_sample_is_flagged(cnn_path, digits, tmp_path):
    """An untrained model (weights=None, or weights never loaded) gives one class for everything: without labels its
    every artifact "agreed" 100% with it and nothing said that this measured nothing."""
    from edgekit import _tf

    keras3 = _tf.keras3()
    model = keras3.Sequential([keras3.Input((8, 8, 1)), keras3.layers.Flatten(),
                               keras3.layers.Dense(10, activation="softmax", kernel_initializer="zeros",
                                                   bias_initializer=keras3.initializers.Constant(np.eye(10)[3]))])
    model.save(tmp_path / "untrained.keras")
    np.savez(tmp_path / "nolabels.npz", x=digits.x[:300])
    result = compress(tmp_path / "untrained.keras", tmp_path / "nolabels.npz", tmp_path / "out", progress=False,
                      config=config(formats="onnx"))
    assert result.source["accuracy"] == 100.0 and artifact(result, "onnx").top1_agreement == 100.0
    assert [w for w in result.warnings if w.startswith("the source model gives class 3 for all 60 evaluation "
                                                       "samples: top-1 agreement and accuracy cannot show")]
    assert "gives class 3 for all 60 evaluation samples" in (tmp_path / "out" / "report.md").read_text()
    trained = compress(cnn_path, "digits", None, progress=False, config=config(formats="onnx",
                                                                              recipe=Recipe(quantize="none")))
    assert not [w for w in trained.warnings if "gives class" in w]


def test_every_registered_exporter_has_a_case():
    assert set(EXPORTERS) == set(Format)
    with pytest.raises(InputError, match="unknown format 'coreml'; valid: tflite, onnx"):
        exporter("coreml")


@pytest.mark.parametrize("kwargs, message", [
    ({"prune": 1.5}, "between 0 and 1"),
    ({"structured": (3, 8)}, "3:8 is not supported; use 2:4"),
    ({"structured": "two"}, "must be a pair"),
    ({"quantize": "int4"}, "unknown quantization 'int4'; valid values: none, dynamic, float16, int8, qat"),
    ({"prune": 0.5, "structured": (2, 4)}, "not both"),
    ({"student_width": 2.0}, "between 0 and 1"),
])
def test_recipe_validation(kwargs, message):
    with pytest.raises(InputError, match=message):
        Recipe(**kwargs)


def test_config_validation():
    with pytest.raises(InputError, match="unknown format 'tflite2'"):
        CompressConfig(formats="tflite2")
    with pytest.raises(InputError, match=">= 0 points"):
        CompressConfig(max_accuracy_drop=-1)
    for minutes in (0, -5, float("nan"), 1441):
        with pytest.raises(InputError, match="the search time must be more than 0 and at most 1440 minutes"):
            CompressConfig(search_minutes=minutes)
    assert Recipe(prune=0.75, quantize="int8").name == "prune75+int8"


def test_layers_pruning_cannot_touch_are_listed_with_the_reason(keras3_path, tmp_path):
    out = tmp_path / "p"
    compress(keras3_path, "digits", out, progress=False,
             config=config(recipe=Recipe(prune=0.5, quantize="none"), formats="tflite",
                           training=fast_training(finetune_epochs=1)))
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = manifest["skipped_layers"]["prune"]
    depthwise = [name for name in skipped if "depthwise" in name]
    assert depthwise and "prunes no weights of a DepthwiseConv2D" in skipped[depthwise[0]]
    assert manifest["layer_sparsity"][depthwise[0]] == 0.0
    report = (out / "report.md").read_text()
    assert "## Layers a technique left as they were" in report and depthwise[0] in report


def test_a_recurrent_int8_tflite_is_right_in_a_plain_interpreter_loop(text_model_path, text_npz, tmp_path):
    """The fused LSTM kept its state between invoke() calls: a standard loop scored 24.7% for 89.2% claimed."""
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "rnn"
    result = compress(text_model_path, text_npz, out, progress=False,
                      config=config(recipe=Recipe(quantize="int8"), formats="tflite"))
    art = result.selected.artifacts[0]
    assert any("keeps no state" in note for note in art.notes)
    interpreter = Interpreter(model_path=str(out / "model.tflite"))  # no edgekit agent, no state reset
    interpreter.allocate_tensors()
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    data = np.load(text_npz)
    x, y = data["x"][-200:], data["y"][-200:]
    hits = 0
    for i in range(len(x)):
        interpreter.set_tensor(inp["index"], x[i:i + 1].astype(inp["dtype"]))
        interpreter.invoke()
        hits += int(interpreter.get_tensor(outp["index"])[0].argmax() == y[i])
    assert hits / len(x) * 100 >= art.accuracy - 3  # the loop agrees with what the manifest claims


@pytest.mark.parametrize("keras_version", ["keras3", "tf-keras"])
def test_a_group_normalization_model_gets_its_tflite(keras_version, digits, tmp_path):
    """GroupNormalization (tf-keras's, and Keras 3's rebuilt as it) weighs its moments by a mask of ones shaped like
    its input: the converter left a BROADCAST_TO of a runtime shape that LiteRT refuses to prepare, so no .tflite was
    written, float32 included. The artifact computes the unweighted moments: the same numbers, plain ops."""
    from edgekit import _tf
    from edgekit.export.tflite import tflite_ops

    keras = _tf.keras3() if keras_version == "keras3" else _tf.keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.GroupNormalization(groups=4)(keras.layers.Conv2D(8, 3, padding="same")(inputs))
    x = keras.layers.Flatten()(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(digits.x, digits.y, epochs=3, verbose=0)
    model.save(tmp_path / "gn.keras")
    result = compress(tmp_path / "gn.keras", "digits", tmp_path / "out", progress=False,
                      config=config(recipe=Recipe(quantize="none"), formats="tflite"))
    art = artifact(result, "tflite")
    assert art.conversion_max_abs_diff < 1e-4 and art.top1_agreement == 100.0
    assert result.source["accuracy"] > 50 and "BROADCAST_TO" not in tflite_ops((tmp_path / "out" / "model.tflite")
                                                                            .read_bytes())


@pytest.mark.parametrize("mode", ["reestimate", "freeze", "keep"])
def test_each_batchnorm_mode_does_what_it_says(mode):
    from edgekit import BatchNorm, _tf
    from edgekit._progress import Progress
    from edgekit.loading.data import Dataset
    from edgekit.optimize._fit import after_finetune, fit

    keras = _tf.keras()
    _tf.set_seed(0)
    bn = keras.layers.BatchNormalization(momentum=0.999)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6), bn, keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, 4)) * 3 + 5).astype(np.float32)
    data = Dataset(x, rng.integers(0, 3, 256), "t")
    fit(model, data, epochs=1, batch_size=32, learning_rate=1e-2, probabilities=False,
        progress=Progress(enabled=False), desc="t", batchnorm=BatchNorm(mode))
    after_fit = bn.moving_mean.numpy().copy()
    if mode == "freeze":  # inference mode while fine-tuning: the statistics did not move at all
        np.testing.assert_array_equal(after_fit, np.zeros(6, np.float32))
    after_finetune(model, x, batch_size=32, batchnorm=BatchNorm(mode))
    features = model.layers[0](x).numpy()
    if mode == "keep":  # momentum 0.999 over 8 steps: still near the initial zeros, far from the data
        np.testing.assert_array_equal(bn.moving_mean.numpy(), after_fit)
        assert np.max(np.abs(bn.moving_mean.numpy() - features.mean(0))) > 0.5
    else:  # recomputed from the data the fine-tuned layers produce
        np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(0), atol=1e-3)
        assert bn.trainable


def test_an_op_tflite_lacks_is_named_with_its_layer_and_onnx_is_still_written(tmp_path):
    from edgekit import _tf

    keras = _tf.keras3()

    @keras.saving.register_keras_serializable(package="edgekit_tests")
    class Determinant(keras.layers.Layer):
        """A user's layer whose op (MatrixDeterminant) TFLite has no builtin kernel for; ONNX has Det."""

        def call(self, x):
            square = keras.ops.reshape(x, (-1, 8, 8))[:, :2, :2] + keras.ops.eye(2)
            return keras.ops.expand_dims(keras.ops.det(square), -1)

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    features = keras.layers.Concatenate()([keras.layers.Flatten()(inp), Determinant(name="det_layer")(inp)])
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(features))
    model.save(tmp_path / "det.keras")
    result = compress(tmp_path / "det.keras", "digits", tmp_path / "out", progress=False,
                      config=config(recipe=Recipe(quantize="none")))
    assert [a.format.value for a in result.selected.artifacts] == ["onnx"]
    error = result.selected.format_errors["tflite"]
    assert "op MatrixDeterminant (layer 'det_layer') has no TFLite builtin kernel" in error, error
    assert (tmp_path / "out" / "model.onnx").is_file() and not (tmp_path / "out" / "model.tflite").exists()


def test_latency_is_measured_against_float32_and_can_be_selected_on(cnn_path, tmp_path):
    search = (Recipe(quantize="float16"), Recipe(quantize="dynamic"), Recipe(quantize="int8"))
    result = compress(cnn_path, "digits", tmp_path / "lat", progress=False,
                      config=config(max_accuracy_drop=5, search=search, select_by="latency_us"))
    for fmt in ("tflite", "onnx"):
        assert result.reference[fmt]["latency_us"] > 0  # the source's float32 artifact, timed in the same runtime
    arts = [a for c in result.candidates for a in c.artifacts]
    assert all(a.latency_us > 0 and a.float32_latency_us == result.reference[a.format.value]["latency_us"]
               for a in arts)
    within = [c for c in result.candidates if c.within_budget]
    assert result.selected is min(within, key=lambda c: c.artifacts[0].latency_us)  # the fastest within budget
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert all(a["latency_us"] > 0 and a["float32_latency_us"] > 0 for a in manifest["artifacts"])
    report = (tmp_path / "lat" / "report.md").read_text()
    assert "| µs / sample | vs float32 time |" in report and "float32 (source, reference)" in report


def test_an_artifact_slower_than_float32_is_flagged_and_noted():
    from types import SimpleNamespace

    from edgekit.artifacts.report import slower_notes, speed_text
    from edgekit.artifacts.results import ArtifactResult

    def art(latency, reference, size=10, float_size=40):
        return ArtifactResult(Format.ONNX, "model.onnx", b"x" * size, Quantization.INT8, 0.0, 90.0, 1.0, 99.0, 0.1,
                              0.1, None, "onnxruntime", [], [], [], latency_us=latency, float32_latency_us=reference,
                              float32_bytes=float_size)

    slow, quick, noise = art(840.0, 470.0), art(300.0, 470.0), art(500.0, 470.0)
    assert slow.slower_than_float32 and not quick.slower_than_float32 and not noise.slower_than_float32
    # a side-by-side ratio (int8's speed step measures one) outranks the two medians measured apart
    timed_fast, timed_slow = art(840.0, 470.0), art(300.0, 470.0)
    timed_fast.float32_time_ratio, timed_slow.float32_time_ratio = 0.8, 1.5
    assert not timed_fast.slower_than_float32 and timed_slow.slower_than_float32
    assert speed_text(timed_fast) == "0.80x" and speed_text(timed_slow) == "1.50x SLOWER"
    assert speed_text(slow) == "1.79x SLOWER" and speed_text(quick) == "0.64x"
    notes = slower_notes(SimpleNamespace(artifacts=[slow, quick]))
    assert notes == ["onnx int8 runs 1.79x the time of the float32 onnx in onnxruntime (840 vs 470 µs per sample): "
                     "it is smaller, not faster"]
    # the side-by-side ratio is not the ratio of the medians beside it: the note says which is which
    assert slower_notes(SimpleNamespace(artifacts=[timed_slow])) == [
        "onnx int8 runs 1.50x the time of the float32 onnx in onnxruntime (timed side by side; medians measured "
        "apart: 300 vs 470 µs per sample): it is smaller, not faster"]
    # an unrolled GRU's int8 .tflite was 103,752 bytes against 57,012 as float32 and 2.2x slower, said to be smaller
    big_slow, big = art(840.0, 470.0, 2000, 1000), art(300.0, 470.0, 2000, 1000)
    assert big.larger_than_float32 and not quick.larger_than_float32
    assert slower_notes(SimpleNamespace(artifacts=[big_slow, big])) == [
        "onnx int8 runs 1.79x the time of the float32 onnx in onnxruntime (840 vs 470 µs per sample): it is larger "
        "(2,000 vs 1,000 bytes) and slower", "onnx int8 is larger (2,000 vs 1,000 bytes) than the float32 onnx"]
    # a size rung that beat float32's bytes but was not kept says so, with the reason (an LSTM(32)'s dynamic-lstm
    # rung measured 8,959 bytes against 20,813 in float32, at 1.17x the int8 artifact's time)
    big.size_tried = {"per-tensor": {"drop": 0.0, "bytes": 1990, "saved": 10, "time": 1.0},
                      "dynamic-lstm": {"drop": -0.42, "bytes": 600, "saved": 1400, "time": 1.172}}
    assert slower_notes(SimpleNamespace(artifacts=[big])) == [
        "onnx int8 is larger (2,000 vs 1,000 bytes) than the float32 onnx; size rung dynamic-lstm measured 600 bytes "
        "but was not kept at 1.17x its time"]
    big.size_tried["dynamic-lstm"].update(time=0.9, drop=2.5)
    assert slower_notes(SimpleNamespace(artifacts=[big]))[0].endswith("was not kept at +2.50 points")


def test_a_keras3_grouped_convolution_and_exact_gelu_convert_to_onnx(digits):
    """ConvNeXt's pieces, in a model tf-keras cannot rebuild (RMSNormalization), so its own graph is converted:
    Keras 3 runs a grouped Conv2D in an XLA function grappler does not inline (tf2onnx left a
    StatefulPartitionedCall, onnxruntime refused the graph), and exact GELU is TensorFlow's Erfc, which ONNX lacks.
    No .onnx was written for either."""
    from edgekit import _tf

    keras = _tf.keras3()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 1),
                              layers.Conv2D(8, 3, padding="same", groups=8), layers.Activation("gelu"),
                              layers.RMSNormalization(),
                              layers.Flatten(), layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x, digits.y, epochs=2, verbose=0)
    result = compress(model, digits, None, progress=False, config=CompressConfig(recipe=Recipe(quantize="int8")))
    assert result.selected.format_errors == {}
    onnx_art = next(a for a in result.selected.artifacts if a.format is Format.ONNX)
    assert onnx_art.top1_agreement >= 90
    ops = {node.op_type for node in onnx.load_from_string(onnx_art.data).graph.node}
    assert ops & {"Conv", "QLinearConv"} and "Erf" in ops and not ops & {"StatefulPartitionedCall", "Erfc"}, ops


def test_a_recurrent_loop_tflite_cannot_run_is_named_with_its_layer(digits):
    """A ConvLSTM2D (no unrolled form) gave "'tf.TensorListReserve' op requires element_shape to be static during
    TF Lite transformation pass", prefixed by a path inside tf_keras: nothing a user could act on."""
    from edgekit import _tf
    from edgekit.export.tflite import to_tflite

    keras = _tf.keras()
    model = keras.Sequential([keras.Input((3, 8, 8, 1)), keras.layers.ConvLSTM2D(2, 3, name="frames"),
                              keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    x = np.stack([digits.x[:16]] * 3, axis=1)
    with pytest.raises(ConversionError, match=r"^TFLite int8 conversion failed: layer 'frames' \(ConvLSTM2D\) loops "
                                              r"over the sequence with TensorList ops, which have no TFLite builtin "
                                              r"kernel \(Flex ops are not on devices\); edgekit unrolls"):
        to_tflite(model, quantization=Quantization.INT8, calibration=x)


def test_an_op_onnx_does_not_define_is_named():
    from onnx import TensorProto, helper

    from edgekit.export.onnx import _check_onnx_ops

    graph = helper.make_graph([helper.make_node("StatefulPartitionedCall", ["x"], ["y"], name="block_0/call")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ConversionError, match=r"left the TensorFlow op StatefulPartitionedCall unconverted \(node "
                                              r"block_0/call\)"):
        _check_onnx_ops(helper.make_model(graph))
