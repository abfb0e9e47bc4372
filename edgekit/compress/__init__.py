"""Compression techniques: pruning, quantization-aware training, distillation."""
