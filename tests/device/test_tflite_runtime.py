"""A device-like environment: the device wheel alone with tflite-runtime (numpy < 2) runs, trains and federates."""

import subprocess

import numpy as np
import pytest
from conftest import ROOT

from device_agents import Model

TFLRT_PYTHON = ROOT / ".venv-tflite-runtime" / "bin" / "python"


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
