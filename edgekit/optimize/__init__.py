"""Training-based techniques: magnitude and 2:4 pruning, quantization-aware training and
knowledge distillation (tensorflow-model-optimization, tf-keras), plus their shared fine-tuning loop.

May import: ``edgekit.loading`` and below (``errors``, ``config``, ``_tf``, ``_progress``).
"""
