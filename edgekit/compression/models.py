"""Each recipe's Keras model: the source, a distilled student, a pruned or QAT-tuned copy (tfmot), reusing what
earlier recipes of the same compression built (a student and a pruned model serve several recipes)."""

from __future__ import annotations

from typing import Any

from edgekit import _tf
from edgekit._progress import Progress
from edgekit.config import CompressConfig, Quantization, Recipe
from edgekit.loading.data import Splits
from edgekit.loading.models import LoadedModel, ends_in_softmax, load_model, pin_input


class ModelFactory:
    """The model to export for a recipe, its float twin (they differ for QAT), its per-layer sparsity, and the layers
    each technique left as they were (:attr:`skipped`: recipe -> technique -> layer -> why)."""

    def __init__(self, loaded: LoadedModel, splits: Splits, config: CompressConfig, progress: Progress) -> None:
        self.loaded, self.splits, self.config, self.progress = loaded, splits, config, progress
        self._cache: dict[tuple, tuple] = {}
        self.skipped: dict[str, dict[str, dict[str, str]]] = {}

    def build(self, recipe: Recipe) -> tuple[Any, Any, dict[str, float]]:
        """The model to export, its float twin (differs for QAT) and its per-layer sparsity."""
        return self._keras_model(recipe)

    def _base(self, recipe: Recipe) -> tuple[Any, tuple]:
        from edgekit.optimize.distill import distill, thin_student

        if not recipe.distills:
            return self.loaded.source, ("teacher",)
        key = ("student", recipe.student_width, recipe.student)
        if key not in self._cache:
            _tf.set_seed(self.config.seed)
            teacher = self.loaded.trainable_model("distillation")
            if recipe.student is not None:
                student_loaded = pin_input(load_model(recipe.student), self.loaded.input_shape)
                student, student_probs = student_loaded.trainable_model("distillation"), \
                    student_loaded.outputs_probabilities
            else:
                student, student_probs = thin_student(teacher, recipe.student_width), self.loaded.outputs_probabilities
            distill(teacher, student, self.splits.finetune, training=self.config.training,
                    teacher_probabilities=self.loaded.outputs_probabilities, student_probabilities=student_probs,
                    progress=self.progress, seed=self.config.seed)
            self._cache[key] = (student, {})
        return self._cache[key][0], key

    def _keras_model(self, recipe: Recipe) -> tuple[Any, Any, dict[str, float]]:
        """The model to export, its float twin (differs for QAT) and its per-layer sparsity."""
        from edgekit.optimize.prune import layer_sparsity, prune
        from edgekit.optimize.qat import float_twin, quantize_aware

        base, key = self._base(recipe)
        sparsity: dict[str, float] = {}
        if base is self.loaded.source and (recipe.prunes or recipe.quantize is Quantization.QAT):
            base = self.loaded.trainable_model("pruning" if recipe.prunes else "quantization-aware training")
        if base is self.loaded.graph and self.loaded.graph is not None:  # post-training from the graph
            return base, base, {}
        probabilities = ends_in_softmax(base)
        if recipe.prunes:
            pkey = (*key, "prune", recipe.prune, recipe.structured)
            if pkey not in self._cache:
                pruned = prune(base, self.splits.finetune, sparsity=recipe.prune, structured=recipe.structured,
                               training=self.config.training, probabilities=probabilities,
                               progress=self.progress, seed=self.config.seed)
                self._cache[pkey] = (pruned.model, pruned.per_layer, pruned.skipped)
            base, sparsity, skipped = self._cache[pkey]
            self.skipped.setdefault(recipe.name, {})["prune"] = skipped
        else:
            sparsity = layer_sparsity(base)
        if recipe.quantize is Quantization.QAT:
            qat_model, skipped = quantize_aware(base, self.splits.finetune, training=self.config.training,
                                                probabilities=probabilities, progress=self.progress,
                                                preserve_sparsity=recipe.prunes, seed=self.config.seed)
            self.skipped.setdefault(recipe.name, {})["qat"] = skipped
            twin = float_twin(qat_model, base)
            return qat_model, twin, layer_sparsity(twin)
        return base, base, sparsity
