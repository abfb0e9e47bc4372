"""Device-agent benchmark vs the source Keras model run with TensorFlow, side by side in one run.

Cold start (process start to first prediction, wall time of a fresh process), single-sample latency
p50/p99, peak RSS, installed size of the agent's environment vs the server's, agent overhead over
the raw interpreter ``invoke()``, and one on-device training step vs TensorFlow's own step.
The agent environment is a fresh venv, made for each run, holding what a device installs to serve: the
edgekit-device-agent distribution with its LiteRT extra (numpy, ai-edge-litert, tuf, cryptography), pinned by
requirements.lock; no TensorFlow, no Flower (`make test`'s .venv-device holds the federated extra too, so it is
not used).

    .venv/bin/python benchmarks/agent.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import ROOT, interleaved_us, machine, median_us, write_section  # noqa: E402

TARGETS = ("cold start >= 20x faster and peak RSS >= 10x smaller than TensorFlow; installed footprint <= 1/10 "
           "of TensorFlow's; agent overhead over raw invoke() <= 10% at p50; training step within 2x of "
           "TensorFlow's step")

AGENT_SNIPPET = """
import sys, numpy as np
from device_agents import Model
from device_agents.serving.telemetry import peak_rss_mib
m = Model.load(sys.argv[1]); m.predict(np.load(sys.argv[2])[:1]); print(peak_rss_mib())
"""
TF_SNIPPET = """
import sys, numpy as np
from edgekit.loading.models import load_model
from device_agents.serving.telemetry import peak_rss_mib
m = load_model(sys.argv[1]).model; m(np.load(sys.argv[2])[:1], training=False); print(peak_rss_mib())
"""


def device_venv(work: Path) -> Path:
    """A fresh venv under ``work`` with the device agent and its LiteRT extra, pinned by requirements.lock."""
    venv = work / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"),
                    f"{ROOT / 'device_agents'}[litert]"], check=True)
    return python


def site_packages_mib(python: Path) -> float:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    total = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file() and not f.is_symlink())
    return total / 2**20


def cold_start(python: Path, snippet: str, *args: str, runs: int = 5) -> tuple[float, float]:
    """Median wall seconds of a fresh process to its first prediction (and exit), and its peak RSS."""
    times, rss = [], []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([str(python), "-c", snippet, *args], capture_output=True, text=True, env=env, check=True)
        times.append(time.perf_counter() - start)
        rss.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times), statistics.median(rss)


def main() -> int:
    from ai_edge_litert.interpreter import Interpreter

    from device_agents import Model
    from device_agents.training.trainer import Trainer
    from edgekit import CompressConfig, Recipe, TrainableConfig, _tf, compress, export_trainable
    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, load_digits, split
    from edgekit.trainable.export import step_parity
    from edgekit.trainable.graph import reference_step

    data = load_digits()
    parts = split(data, seed=0)
    train = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                    np.concatenate([parts.finetune.y, parts.calibration.y]), "train")
    work = Path(tempfile.mkdtemp(prefix="edgekit-bench-"))
    model = zoo.train(zoo.digits_cnn(), train, epochs=15)
    model.save(work / "cnn.keras")
    compress(work / "cnn.keras", data, work / "int8", progress=False,
             config=CompressConfig(recipe=Recipe(quantize="int8"), formats="tflite"))
    export_trainable(work / "cnn.keras", work / "trainable", config=TrainableConfig(batch_size=32), progress=False)
    sample = parts.evaluation.x[:1]
    np.save(work / "x.npy", parts.evaluation.x[:8])
    artifact = work / "int8" / "model.tflite"

    # cold start and peak RSS, each in a fresh process
    device_python = device_venv(work)
    agent_cold, agent_rss = cold_start(device_python, AGENT_SNIPPET, str(artifact), str(work / "x.npy"))
    tf_cold, tf_rss = cold_start(Path(sys.executable), TF_SNIPPET, str(work / "cnn.keras"), str(work / "x.npy"))

    # single-sample latency, in this process
    keras_p50, keras_p99 = median_us(lambda: model(sample, training=False), repeats=300)
    agent = Model.load(artifact, num_threads=1)
    agent_p50, agent_p99 = median_us(lambda: agent.predict(sample), repeats=2000)
    raw = Interpreter(model_path=str(artifact), num_threads=1)
    raw.allocate_tensors()
    inp, outp = raw.get_input_details()[0], raw.get_output_details()[0]

    def raw_invoke() -> None:
        raw.set_tensor(inp["index"], sample)
        raw.invoke()
        raw.get_tensor(outp["index"])

    overhead_rows = [("digits CNN int8 (94k parameters)",
                      *interleaved_us(lambda: agent.predict(sample), raw_invoke, per_block=300))]
    from edgekit.config import Quantization
    from edgekit.export.tflite import to_tflite

    mobile_x = load_digits(96, 3).x[:64]
    mobile_bytes, _ = to_tflite(zoo.mobilenet_v2(), quantization=Quantization.INT8, calibration=mobile_x)
    mobile = Model.load(mobile_bytes, num_threads=1)
    mobile_raw = Interpreter(model_content=mobile_bytes, num_threads=1)
    mobile_raw.allocate_tensors()
    m_in, m_out = mobile_raw.get_input_details()[0], mobile_raw.get_output_details()[0]

    def mobile_invoke() -> None:
        mobile_raw.set_tensor(m_in["index"], mobile_x[:1])
        mobile_raw.invoke()
        mobile_raw.get_tensor(m_out["index"])

    overhead_rows.append(("MobileNetV2 0.35 int8, 96x96x3 (423k parameters)",
                          *interleaved_us(lambda: mobile.predict(mobile_x[:1]), mobile_invoke, per_block=40)))

    # installed footprint
    device_mib = site_packages_mib(device_python)
    server_mib = site_packages_mib(Path(sys.executable))
    tf_dir = Path(_tf.tf().__file__).parent
    tf_mib = sum(f.stat().st_size for f in tf_dir.rglob("*") if f.is_file()) / 2**20

    # one training step on a batch of 32
    trainer = Trainer.load(work / "trainable", num_threads=1)
    xb, yb = parts.finetune.x[:32], parts.finetune.y[:32].astype(np.int32)
    def lite_train() -> None:  # TensorFlow's step below runs the model in inference mode: Dropout off here too
        trainer.train_step(xb, yb, learning_rate=0.01, dropout=0.0)

    tf = _tf.tf()
    keras = _tf.keras()
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def tf_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    # the step being timed is TensorFlow's SGD step: checked on the untouched weights before any timing
    before = trainer.get_weights()
    lite_train()  # the device's default step drops units at random (Keras's training mode): not TensorFlow's step
    want = reference_step(model, xb, yb, learning_rate=0.01)
    parity = step_parity(before, trainer.get_weights(), want)  # the export's own parity rule
    trainer.set_weights(before)
    if not parity.ok:
        raise SystemExit(f"the LiteRT train step differs from TensorFlow's on {parity.worst} by "
                         f"{parity.worst_relative:.3g} of the step (max abs {parity.max_abs_diff:.3g}): not timing it")
    tf_step(xb, yb)
    lite_step, tf_step_us, step_ratio = interleaved_us(lite_train, lambda: tf_step(xb, yb), per_block=20)

    rows = [
        ("process start to first prediction (s, median of 5)", f"{tf_cold:.2f}", f"{agent_cold:.3f}",
         f"{tf_cold / agent_cold:.1f}x faster"),
        ("peak RSS of that process (MiB)", f"{tf_rss:.0f}", f"{agent_rss:.0f}", f"{tf_rss / agent_rss:.1f}x smaller"),
        ("single-sample latency p50 (µs)", f"{keras_p50:.0f}", f"{agent_p50:.1f}", f"{keras_p50 / agent_p50:.0f}x"),
        ("single-sample latency p99 (µs)", f"{keras_p99:.0f}", f"{agent_p99:.1f}", f"{keras_p99 / agent_p99:.0f}x"),
        ("installed site-packages (MiB)", f"{server_mib:.0f} (TensorFlow alone {tf_mib:.0f})", f"{device_mib:.0f}",
         f"{tf_mib / device_mib:.1f}x smaller than TensorFlow alone"),
        ("training step, batch 32 (µs, median)", f"{tf_step_us:.0f}", f"{lite_step:.0f}",
         f"{step_ratio:.2f}x TensorFlow's time"),
    ]
    body = "\n".join([
        "## Device agent (`benchmarks/agent.py`)", "",
        f"Command: `.venv/bin/python benchmarks/agent.py`. Machine: {machine()}.", "",
        f"Targets (issue): {TARGETS}.", "",
        "Model: the digits CNN (94,410 parameters); the agent runs its int8 TFLite artifact with ai-edge-litert "
        "(1 thread) in a fresh venv holding the device agent with its LiteRT extra (numpy, ai-edge-litert, tuf, "
        "cryptography; no Flower); TensorFlow runs the source "
        "`.keras` model (Keras `__call__`).", "",
        "| measure | TensorFlow (source model) | device agent | ratio |", "|---|---:|---:|---:|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows), "",
        "Agent overhead: `Model.predict` (shape/dtype checks, float32 in/out) vs the raw interpreter "
        "(`set_tensor`/`invoke`/`get_tensor`), one sample; the two are measured in alternating blocks "
        "(10 blocks) and the overhead is the median of the per-block ratios:", "",
        "| model | agent p50 (µs) | raw invoke p50 (µs) | overhead (µs) | overhead (median block ratio) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {a:.1f} | {r:.1f} | {a - r:+.1f} | {(ratio - 1) * 100:+.1f}% |"
          for name, a, r, ratio in overhead_rows), "",
        "The training step ratio is likewise the median of per-block ratios (10 alternating blocks of 20 steps); "
        "both steps are SGD with the model's Dropout off (TensorFlow's runs the model in inference mode; the "
        "device's `dropout=0.0`), checked equal on the untouched weights by the export's own parity rule first.",
    ])
    write_section("agent", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
