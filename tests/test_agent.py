"""The device agent: every runtime path, int8 I/O, integrity, telemetry, CLI, no TensorFlow, its own wheel."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import BIN, ROOT, assert_one_line_error, run_cli

from device_agents import AgentError, ArtifactError, InputMismatchError, IntegrityError, Model
from device_agents.serving.integrity import verified_artifact
from device_agents.serving.runtime import LOADERS, Runtime
from device_agents.serving.telemetry import Telemetry

TFLRT_PYTHON = ROOT / ".venv-tflite-runtime" / "bin" / "python"


def test_every_runtime_has_a_loader():
    assert set(LOADERS) == set(Runtime)


def test_litert_and_onnxruntime_agree_with_the_manifest(int8_out, digits):
    manifest = json.loads((int8_out / "manifest.json").read_text())
    from edgekit.loading.data import split

    ev = split(digits, seed=0).evaluation
    for entry in manifest["artifacts"]:
        model = Model.load(int8_out / entry["file"], num_threads=1)
        assert model.runtime is (Runtime.LITERT if entry["format"] == "tflite" else Runtime.ONNXRUNTIME)
        out = model.predict(ev.x)
        assert out.dtype == np.float32 and out.shape == (len(ev), 10)
        assert float(np.mean(out.argmax(1) == ev.y) * 100) == pytest.approx(entry["accuracy"], abs=1e-3)
        one = model.predict(ev.x[0])  # a single sample without the batch axis
        assert one.shape == (10,)


def test_int8_io_is_quantized_by_the_agent(int8_out, digits):
    model = Model.load(int8_out / "model.tflite")
    spec = model.inputs[0]
    assert spec.dtype == "int8" and spec.scale > 0 and model.outputs[0].dtype == "int8"
    probs = model.predict(digits.x[:20])
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=0.05)


def test_bad_requests_raise_one_documented_type(int8_out):
    model = Model.load(int8_out / "model.tflite")
    with pytest.raises(InputMismatchError, match=r"input has shape \(2, 9, 9, 1\), the model expects \(n, 8, 8, 1\)"):
        model.predict(np.zeros((2, 9, 9, 1), np.float32))
    with pytest.raises(InputMismatchError, match=r"input has shape \(50, 28, 28\), the model expects \(n, 8, 8, 1\)"):
        model.predict(np.zeros((50, 28, 28), np.float32))  # the user's own shape, not one with a batch axis added
    with pytest.raises(InputMismatchError, match="expects numbers"):
        model.predict(np.array([[["a"] * 1] * 8] * 8, dtype=object)[None])
    with pytest.raises(ArtifactError, match="neither a TFLite flatbuffer nor an ONNX model"):
        Model.load(b"\x00garbage")
    with pytest.raises(ArtifactError, match="unknown runtime 'coreml'"):
        Model.load(int8_out / "model.tflite", runtime="coreml")
    with pytest.raises(ArtifactError, match="cannot run tflite artifacts"):
        Model.load(int8_out / "model.tflite", runtime="onnxruntime")
    truncated = (int8_out / "model.tflite").read_bytes()[:2000]
    with pytest.raises(ArtifactError, match="litert cannot load the artifact"):
        Model.load(truncated)
    # an app that catches the one documented type catches every bad request
    for bad in (lambda: model.predict(np.zeros((2, 9, 9, 1), np.float32)), lambda: Model.load(b"\x00garbage"),
                lambda: Model.load(truncated), lambda: Model.load(int8_out / "model.tflite", runtime="coreml")):
        with pytest.raises(AgentError):
            bad()


def test_integrity_refuses_a_tampered_artifact(int8_out, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_out, copy)
    assert verified_artifact(copy).format == "tflite"
    data = bytearray((copy / "model.tflite").read_bytes())
    data[100] ^= 0x01
    (copy / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its manifest: sha256"):
        verified_artifact(copy)


def test_telemetry_records_aggregates_only(int8_out, tmp_path, digits):
    model = Model.load(int8_out / "model.tflite")
    telemetry = Telemetry(model_version="v1")
    for i in range(20):
        with telemetry.measure():
            model.predict(digits.x[i])
    with pytest.raises(InputMismatchError), telemetry.measure():
        model.predict(np.zeros((1, 3)))
    path = telemetry.write(tmp_path / "t.json")
    snap = json.loads(path.read_text())
    assert set(snap) == {"model_version", "inferences", "samples", "errors", "latency_ms", "peak_rss_mib", "uptime_s"}
    assert snap["inferences"] == 20 and snap["errors"] == 1
    assert 0 < snap["latency_ms"]["p50"] <= snap["latency_ms"]["p90"] <= snap["latency_ms"]["p99"]


def test_agent_cli_predict_bench_install_without_tensorflow(int8_out, digits, tmp_path):
    np.savez(tmp_path / "x.npz", x=digits.x[:64])
    code = ("import sys; from device_agents.cli import main; rc = main(sys.argv[1:]); "
            "print('TF_LOADED' if any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules) "
            "else 'NO_TF'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "predict", "--model", str(int8_out), "--input",
                           str(tmp_path / "x.npz"), "--output", str(tmp_path / "y.npy"), "--telemetry",
                           str(tmp_path / "tel.json")], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert "NO_TF" in proc.stdout
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (64, 10) and y.dtype == np.float32
    assert np.mean(y.argmax(1) == digits.y[:64]) > 0.9
    assert json.loads((tmp_path / "tel.json").read_text())["samples"] == 64
    bench = run_cli("bench", "--model", str(int8_out / "model.onnx"), "--repeats", "50", "--json",
                    tool="edgekit-agent")
    report = json.loads(bench.stdout)
    assert report["runtime"] == "onnxruntime" and report["latency_ms"]["p50"] > 0 and report["peak_rss_mib"] > 0
    install = run_cli("install", "--model", str(int8_out), "--store", str(tmp_path / "store"), tool="edgekit-agent")
    assert install.returncode == 0 and "installed" in install.stdout
    via_store = run_cli("predict", "--model", str(tmp_path / "store"), "--input", str(tmp_path / "x.npz"),
                        "--output", str(tmp_path / "y2.npy"), tool="edgekit-agent")
    assert via_store.returncode == 0 and np.array_equal(np.load(tmp_path / "y2.npy"), y)


@pytest.mark.parametrize("case", ["corrupt", "shape", "hash", "no x", "no rollback"])
def test_agent_cli_bad_input(case, int8_out, tmp_path):
    import shutil

    np.savez(tmp_path / "x.npz", x=np.zeros((3, 8, 8, 1), np.float32))
    args = ["predict", "--model", str(int8_out), "--input", str(tmp_path / "x.npz"),
            "--output", str(tmp_path / "y.npy")]
    if case == "corrupt":
        (tmp_path / "bad.tflite").write_bytes(b"\x00\x00\x00\x00TFL3" + b"\x01" * 40)
        args[2], want = str(tmp_path / "bad.tflite"), "cannot load the artifact"
    elif case == "shape":
        np.savez(tmp_path / "x.npz", x=np.zeros((3, 5), np.float32))
        want = "input has shape (3, 5), the model expects (n, 8, 8, 1)"
    elif case == "hash":
        shutil.copytree(int8_out, tmp_path / "m")
        (tmp_path / "m" / "model.tflite").write_bytes((int8_out / "model.tflite").read_bytes()[:-1] + b"\x00")
        args[2], want = str(tmp_path / "m"), "does not match its manifest"
    elif case == "no x":
        np.savez(tmp_path / "x.npz", y=np.zeros(3))
        want = "has no array 'x'"
    else:
        args, want = ["rollback", "--store", str(tmp_path / "empty")], "no previous version"
    proc = run_cli(*args, tool="edgekit-agent")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and want in proc.stderr, proc.stderr
    assert not (tmp_path / "y.npy").exists()


@pytest.mark.skipif(not TFLRT_PYTHON.exists(), reason="make test creates .venv-tflite-runtime")
def test_tflite_runtime_path_in_its_own_numpy1_venv(int8_out, float_out, digits, tmp_path):
    """tflite-runtime 2.14 needs numpy < 2: it runs in the separate venv make test creates."""
    np.save(tmp_path / "x.npy", digits.x[:100])
    code = (
        "import sys, numpy as np; from device_agents import Model; "
        "out = {}; "
        "[out.__setitem__(p, Model.load(p, runtime='tflite-runtime').predict(np.load(sys.argv[1]))) "
        " for p in sys.argv[2:]]; "
        "[np.save(p + '.out.npy', v) for p, v in out.items()]; "
        "print(np.__version__, 'tensorflow' in sys.modules)")
    paths = [str(int8_out / "model.tflite"), str(float_out / "model.tflite")]
    proc = subprocess.run([str(TFLRT_PYTHON), "-c", code, str(tmp_path / "x.npy"), *paths], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    version, tf_loaded = proc.stdout.split()
    assert version.startswith("1.") and tf_loaded == "False"
    for path in paths:
        theirs = np.load(path + ".out.npy")
        ours = Model.load(path, runtime="litert")
        mine = ours.predict(digits.x[:100])
        if ours.outputs[0].scale is None:  # float: the same kernels' math
            np.testing.assert_allclose(theirs, mine, atol=1e-5)
        else:  # int8 kernels of tflite-runtime 2.14 and LiteRT 2.3 round a few values differently
            assert np.mean(theirs.argmax(1) == mine.argmax(1)) >= 0.98
            assert np.abs(theirs - mine).max() <= 0.05


@pytest.mark.skipif(not TFLRT_PYTHON.exists(), reason="make test creates .venv-tflite-runtime")
def test_tflite_runtime_trains_the_trainable_artifact(cnn_path, digits, tmp_path):
    from edgekit import TrainableConfig, export_trainable

    export_trainable(cnn_path, tmp_path / "tr", config=TrainableConfig(batch_size=8), progress=False)
    np.savez(tmp_path / "d.npz", x=digits.x[:64], y=digits.y[:64])
    code = ("import sys, numpy as np; from device_agents.training.trainer import Trainer; "
            "t = Trainer.load(sys.argv[1], runtime='tflite-runtime'); d = np.load(sys.argv[2]); "
            "losses = t.fit(d['x'], d['y'], epochs=2, learning_rate=0.01); print(t.runtime, losses[-1])")
    proc = subprocess.run([str(TFLRT_PYTHON), "-c", code, str(tmp_path / "tr"), str(tmp_path / "d.npz")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runtime, loss = proc.stdout.split()
    assert runtime == "tflite-runtime" and np.isfinite(float(loss))


@pytest.mark.skipif(not TFLRT_PYTHON.exists(), reason="make test creates .venv-tflite-runtime")
def test_the_device_wheel_installs_alone_and_a_tflite_runtime_device_can_federate(cnn_path, tmp_path):
    """.venv-tflite-runtime holds only the built edgekit-device-agent wheel (+ numpy<2, tflite-runtime)."""
    from edgekit import TrainableConfig, export_trainable

    bin_dir = TFLRT_PYTHON.parent
    assert (bin_dir / "edgekit-agent").is_file() and not (bin_dir / "edgekit").exists()
    help_text = subprocess.run([str(bin_dir / "edgekit-agent"), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "exit codes:" in help_text.stdout
    probe = subprocess.run([str(TFLRT_PYTHON), "-c", "import device_agents, importlib.util as u; "
                            "print(device_agents.__file__, u.find_spec('edgekit'), u.find_spec('edgekit_cli'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    location, edgekit_spec, tools_spec = probe.stdout.split()
    assert "site-packages" in location and edgekit_spec == "None" and tools_spec == "None", probe.stderr
    # the federated client picks its runtime as the agent does: tflite-runtime when LiteRT is absent
    export_trainable(cnn_path, tmp_path / "tr", config=TrainableConfig(batch_size=8), progress=False)
    code = "import sys; from device_agents.federated.client_app import _trainer; print(_trainer(sys.argv[1]).runtime)"
    picked = subprocess.run([str(TFLRT_PYTHON), "-c", code, str(tmp_path / "tr")], capture_output=True, text=True,
                            cwd=tmp_path)
    assert picked.returncode == 0 and picked.stdout.strip() == "tflite-runtime", picked.stderr


def test_the_agent_refuses_a_zip_bomb_and_a_huge_non_model_file_without_reading_them(int8_out, tmp_path):
    import zipfile

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (2**26, 8, 8, 1)})
        member.write(b"\0" * 2**24)  # 16 MiB of a declared 16 GiB: the header is what is checked
    proc = run_cli("predict", "--model", str(int8_out), "--input", str(bomb), "--output", str(tmp_path / "y.npy"),
                   tool="edgekit-agent")
    assert proc.returncode == 2 and "declares shape (67108864, 8, 8, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "y.npy").exists()
    huge = tmp_path / "huge.tflite"
    with open(huge, "wb") as handle:  # 3 GiB, sparse: it costs nothing unless someone reads it
        handle.truncate(3 * 2**30)
    with pytest.raises(ArtifactError, match="neither a TFLite flatbuffer nor an ONNX model"):
        Model.load(huge)
    with open(huge, "r+b") as handle:
        handle.write(b"\0\0\0\0TFL3")
    with pytest.raises(ArtifactError, match="more than the 2,147,483,648 a model artifact may have"):
        Model.load(huge)


def _peak_rss_mib(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` from a fresh Python whose only child it is; (the process, its peak RSS in MiB)."""
    probe = ("import json, resource, subprocess, sys; p = subprocess.run(json.loads(sys.argv[1]), capture_output=True, "
             "text=True); print(json.dumps([p.returncode, p.stdout, p.stderr, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(command)], capture_output=True, text=True,
                         timeout=600, env=env)
    code, stdout, stderr, peak = json.loads(out.stdout)
    return subprocess.CompletedProcess(command, code, stdout, stderr), peak


def test_predict_streams_a_large_input_in_batches_and_the_device_limit_is_settable(float_out, digits, tmp_path):
    """The issue's case: a small deflated npz that inflates to hundreds of MiB. Over the device's default
    limit it is refused from its header; allowed, it is read and run a batch at a time, in bounded memory."""
    from device_agents.files import DEVICE_MAX_ARRAY_BYTES

    rows = 1_200_000  # 307 MB of float32 8x8x1: over the device default, deflates to well under 1 MiB
    x = np.zeros((rows, 8, 8, 1), np.float32)
    x[:50] = digits.x[:50]
    np.savez_compressed(tmp_path / "big.npz", x=x)
    del x
    assert (tmp_path / "big.npz").stat().st_size < 2 << 20 and rows * 256 > DEVICE_MAX_ARRAY_BYTES
    agent = [str(BIN / "edgekit-agent"), "predict", "--model", str(float_out), "--input", str(tmp_path / "big.npz"),
             "--output", str(tmp_path / "y.npy")]
    refused, _ = _peak_rss_mib(agent)
    assert_one_line_error(refused, 2, "declares shape (1200000, 8, 8, 1)", "the limit is 256 MiB")
    assert not (tmp_path / "y.npy").exists()
    done, peak = _peak_rss_mib([*agent, "--max-input-mib", "512", "--batch", "4096"])
    assert done.returncode == 0, done.stderr
    assert peak < 250, peak  # the input alone is 293 MiB
    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert y.shape == (rows, 10)
    model = Model.load(float_out / "model.tflite")
    np.testing.assert_allclose(y[:50], model.predict(digits.x[:50]), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".predict.")]


def test_install_checks_an_artifacts_first_bytes_before_copying_or_hashing_it(float_out, tmp_path):
    """The issue's case: an unpinned store and a 2 GB sparse file listed as model.tflite."""
    folder = tmp_path / "release"
    folder.mkdir()
    manifest = json.loads((float_out / "manifest.json").read_text())
    manifest["artifacts"] = [{**manifest["artifacts"][0], "file": "model.tflite", "bytes": 2_000_000_000}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with open(folder / "model.tflite", "wb") as handle:
        handle.truncate(2_000_000_000)
    proc, peak = _peak_rss_mib([str(BIN / "edgekit-agent"), "install", "--model", str(folder), "--store",
                                str(tmp_path / "store")])
    assert_one_line_error(proc, 1, "neither a TFLite flatbuffer nor an ONNX model", "before its 2,000,000,000 bytes")
    assert peak < 200, peak
    assert not (tmp_path / "store" / "versions").exists() or not any((tmp_path / "store" / "versions").iterdir())
    # an ONNX file listed as tflite is refused too, from its first bytes
    shutil.copy(float_out / "model.onnx", folder / "model.tflite")
    manifest["artifacts"][0]["bytes"] = (folder / "model.tflite").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("install", "--model", str(folder), "--store", str(tmp_path / "store"),
                                  tool="edgekit-agent"), 1, "is a onnx file, its manifest says tflite")


def test_a_closed_pipe_ends_the_agent_quietly(int8_out, tmp_path):
    """`edgekit-agent status ... | head -1`: the reader goes away before the agent writes; it exits 0, silently."""
    store = tmp_path / "store"
    assert run_cli("install", "--model", str(int8_out), "--store", str(store), tool="edgekit-agent").returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.Popen([str(BIN / "edgekit-agent"), "status", "--store", str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b"", (proc.returncode, err)
