"""BatchNormalization after fine-tuning, measured: the three ``TrainingConfig.batchnorm`` modes side by side on
keras.applications MobileNetV2 (Keras 3, width 0.35, 32x32 digits), trained to convergence and saved with the
BN momentum keras.applications use (0.999), as a user's model carries it. Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/batchnorm.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import machine, write_section  # noqa: E402

RECIPES = ("prune50+int8", "prune2:4+int8", "qat")


def build(work: Path) -> tuple[Path, Path]:
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    digits = load_digits(32, 3)
    model = zoo.keras3_architecture("mobilenetv2")  # BN momentum 0.9 while it trains (a short run converges)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(digits.x, digits.y, epochs=10, batch_size=32, verbose=0)
    for layer in model.layers:  # then saved as keras.applications ship it: momentum 0.999
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.999
    model.save(work / "mobilenetv2.keras")
    np.savez(work / "digits32.npz", x=digits.x, y=digits.y)
    return work / "mobilenetv2.keras", work / "digits32.npz"


def main() -> int:
    from edgekit import BatchNorm, CompressConfig, Recipe, TrainingConfig, compress

    path, data = build(Path(tempfile.mkdtemp(prefix="edgekit-bn-")))
    search = (Recipe(prune=0.5, quantize="int8"), Recipe(structured=(2, 4), quantize="int8"), Recipe(quantize="qat"))
    rows, source = {}, None
    for mode in BatchNorm:
        result = compress(path, data, None, progress=False, config=CompressConfig(
            max_accuracy_drop=100.0, formats=("tflite",), search=search, training=TrainingConfig(batchnorm=mode)))
        source = result.source["accuracy"]
        rows[mode] = {c.recipe.name: c.worst_drop for c in result.candidates}
        print(mode.value, rows[mode], flush=True)
    lines = ["## BatchNormalization after fine-tuning", "",
             f"`.venv/bin/python benchmarks/batchnorm.py` on {machine()}. keras.applications MobileNetV2 (width "
             f"0.35, Keras 3, `weights=None`) trained 10 epochs on digits at 32x32x3 (source accuracy {source:.1f}% "
             "on the evaluation split), saved with BN momentum 0.999; each recipe with the default fine-tuning "
             "(4 epochs), `.tflite`; accuracy drop in points (lower is better).", "",
             "| `batchnorm` | " + " | ".join(RECIPES) + " |", "|---|" + "---:|" * len(RECIPES)]
    for mode, drops in rows.items():
        lines.append(f"| {mode.value} | " + " | ".join(f"{drops[name]:+.2f}" for name in RECIPES) + " |")
    lines += ["", "`keep` is what a plain Keras fine-tune does: the moving statistics stay those of the weights "
              "before pruning. The default is `reestimate`."]
    write_section("batchnorm", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
