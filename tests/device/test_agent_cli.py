"""The edgekit-agent command: predict, bench, install without TensorFlow; bad input; streamed batches; a closed pipe."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import BIN, assert_one_line_error, peak_rss_mib, run_cli

from device_agents import Model


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


@pytest.mark.parametrize("case", ["corrupt", "shape", "hash", "no x", "no rollback", "no store"])
def test_agent_cli_bad_input(case, int8_out, tmp_path):

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
    elif case == "no rollback":
        (tmp_path / "empty" / "versions").mkdir(parents=True)
        args, want = ["rollback", "--store", str(tmp_path / "empty")], "no previous version"
    else:  # a mistyped store path created an empty store there (rollback locked it before looking)
        args, want = ["rollback", "--store", str(tmp_path / "typo")], "store " + str(tmp_path / "typo") + " does not"
    proc = run_cli(*args, tool="edgekit-agent")
    assert not (tmp_path / "typo").exists()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and want in proc.stderr, proc.stderr
    assert not (tmp_path / "y.npy").exists()




def test_predict_and_bench_take_a_single_npy_array_checked_as_an_npz_member_is(int8_out, digits, tmp_path):
    """The README's quickstart runs `edgekit-agent predict --input x.npy`: a single .npy array was refused ("not an
    .npz archive"). It is read as x, its header checked first: a lying header, objects, a truncated file refused."""
    np.save(tmp_path / "x.npy", digits.x[:64])
    np.savez(tmp_path / "x.npz", x=digits.x[:64])
    outputs = {}
    for name in ("x.npy", "x.npz"):
        proc = run_cli("predict", "--model", str(int8_out), "--input", str(tmp_path / name), "--output",
                       str(tmp_path / f"{name}.out.npy"), tool="edgekit-agent")
        assert proc.returncode == 0, proc.stderr
        outputs[name] = np.load(tmp_path / f"{name}.out.npy")
    assert outputs["x.npy"].shape == (64, 10) and np.array_equal(outputs["x.npy"], outputs["x.npz"])
    bench = run_cli("bench", "--model", str(int8_out / "model.tflite"), "--input", str(tmp_path / "x.npy"),
                    "--repeats", "20", "--json", tool="edgekit-agent")
    assert bench.returncode == 0 and json.loads(bench.stdout)["latency_ms"]["p50"] > 0, bench.stderr

    lying = bytearray((tmp_path / "x.npy").read_bytes())  # the header declares 10^9 rows; the file holds 64
    header_end = lying.index(b"\n") + 1
    text = lying[:header_end].decode("latin1").replace("(64, 8, 8, 1)", "(1000000000, 8, 8, 1)")
    (tmp_path / "lying.npy").write_bytes(text[:header_end - 1].ljust(header_end - 1).encode("latin1") + b"\n"
                                         + bytes(lying[header_end:]))
    np.save(tmp_path / "objects.npy", np.array([object()] * 3, dtype=object))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:400])
    for name, fragment in (("lying.npy", "declares shape (1000000000, 8, 8, 1)"),
                           ("objects.npy", "holds Python objects"), ("cut.npy", "(truncated or corrupt)")):
        proc, peak = peak_rss_mib([str(BIN / "edgekit-agent"), "predict", "--model", str(int8_out), "--input",
                                   str(tmp_path / name), "--output", str(tmp_path / "refused.npy")])
        assert_one_line_error(proc, 2, fragment)
        assert peak < 250 and not (tmp_path / "refused.npy").exists(), (name, peak)


def test_predict_takes_one_sample_without_its_batch_axis(int8_out, digits, tmp_path):
    """`np.save("x.npy", x[0])`, one image of shape (8, 8, 1): its 8 rows were read as 8 samples, and the output held
    the one sample's 10 scores spread over 8 rows of nothing ("8 predictions"). It is one sample now; an array that
    is neither samples nor one sample is refused with both shapes."""
    np.save(tmp_path / "batch.npy", digits.x[:4])
    np.save(tmp_path / "one.npy", digits.x[0])
    np.save(tmp_path / "flat.npy", digits.x[:5, :, :, 0])
    for name in ("batch", "one"):
        proc = run_cli("predict", "--model", str(int8_out), "--input", str(tmp_path / f"{name}.npy"), "--output",
                       str(tmp_path / f"{name}.out.npy"), tool="edgekit-agent")
        assert proc.returncode == 0, proc.stderr
    assert "1 prediction ->" in proc.stdout
    one, batch = np.load(tmp_path / "one.out.npy"), np.load(tmp_path / "batch.out.npy")
    assert one.shape == (1, 10) and batch.shape == (4, 10) and np.array_equal(one[0], batch[0])
    proc = run_cli("predict", "--model", str(int8_out), "--input", str(tmp_path / "flat.npy"), "--output",
                   str(tmp_path / "flat.out.npy"), tool="edgekit-agent")
    assert_one_line_error(proc, 2, "input has shape (5, 8, 8), the model expects (n, 8, 8, 1)")
    assert not (tmp_path / "flat.out.npy").exists()


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
    refused, _ = peak_rss_mib(agent)
    assert_one_line_error(refused, 2, "declares shape (1200000, 8, 8, 1)", "the limit is 256 MiB")
    assert not (tmp_path / "y.npy").exists()
    done, peak = peak_rss_mib([*agent, "--max-input-mib", "512", "--batch", "4096"])
    assert done.returncode == 0, done.stderr
    assert peak < 250, peak  # the input alone is 293 MiB
    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert y.shape == (rows, 10)
    model = Model.load(float_out / "model.tflite")
    np.testing.assert_allclose(y[:50], model.predict(digits.x[:50]), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".predict.")]


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
