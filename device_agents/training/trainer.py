"""On-device training with edgekit's trainable TFLite artifact (LiteRT or tflite-runtime only).

>>> trainer = Trainer.load("trainable_out")                    # doctest: +SKIP
>>> losses = trainer.fit(x, y, epochs=3, learning_rate=0.05)   # doctest: +SKIP
>>> trainer.evaluate(x_test, y_test)                            # doctest: +SKIP
(0.12, 96.4)
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import ArtifactError, InputMismatchError, TrainingError, first_line
from device_agents.serving.integrity import check_entry, read_manifest
from device_agents.serving.runtime import ArtifactFormat, Model, Runtime, interpreter_class, pick_runtime
from device_agents.training.samples import check_samples, class_labels

DIVERGED_RATIO = 1.5
DIVERGED_MARGIN = 0.1
"""Local training diverged when the loss on the device's data ends above ``RATIO x before + MARGIN`` (or is
not finite): SGD on the data it trains on does not raise that loss unless the step is too large."""
MAX_BACKOFFS = 4
"""How many times :meth:`Trainer.fit_safely` halves the learning rate (down to 1/16 of it)."""
TRAIN_INPUTS = ("x", "y", "sample_weight", "learning_rate", "mu", "momentum", "dropout", "dropout_noise")
"""The inputs of the artifact's ``train`` signature this agent feeds (the manifest's ``trainable.signatures``
lists an artifact's own: one exported before ``momentum``, ``dropout`` or ``dropout_noise`` lacks them)."""


@dataclass(frozen=True)
class LocalFit:
    """What :meth:`Trainer.fit_safely` kept: the attempt's per-epoch losses and learning rate, and the loss
    and accuracy (%) on the training data before and after it."""

    losses: list[float]
    learning_rate: float
    loss_before: float
    loss_after: float
    accuracy: float

    @property
    def diverged(self) -> bool:
        return not (math.isfinite(self.loss_after)
                    and self.loss_after <= DIVERGED_RATIO * self.loss_before + DIVERGED_MARGIN)


class Trainer:
    """Drives the ``train``/``infer``/``get_weights``/``set_weights`` signatures of a trainable artifact."""

    def __init__(self, data: bytes, manifest: dict[str, Any], *, backbone: bytes | None = None,
                 runtime: Runtime | str | None = None, num_threads: int | None = None) -> None:
        spec = manifest.get("trainable")
        if not isinstance(spec, dict):
            raise ArtifactError("the manifest has no 'trainable' section; export with `edgekit trainable`")
        self.spec = spec
        self.batch_size = int(spec["batch_size"])
        self.num_classes = int(spec["num_classes"])
        chosen = pick_runtime(ArtifactFormat.TFLITE, runtime)
        self.runtime = chosen.value
        try:
            self._interpreter = interpreter_class(chosen)(model_content=data, num_threads=num_threads)
            self._train = self._interpreter.get_signature_runner("train")
            self._infer = self._interpreter.get_signature_runner("infer")
            self._get = self._interpreter.get_signature_runner("get_weights")
            self._set = self._interpreter.get_signature_runner("set_weights")
        except (ValueError, RuntimeError) as exc:
            raise ArtifactError(f"the trainable artifact cannot be loaded: {first_line(exc, limit=200)}") from None
        self._backbone = Model.load(backbone, runtime=chosen, num_threads=num_threads) if backbone else None
        if spec.get("mode") == "head-only" and self._backbone is None:
            raise ArtifactError("a head-only trainable artifact needs its backbone.tflite")
        self.tensors = {t["name"]: tuple(t["shape"]) for t in spec["tensors"]}
        # an artifact exported before the train signature had a momentum input trains plain SGD only; one
        # exported before it had a dropout input trains with its Dropout layers off
        train_inputs = (spec.get("signatures") or {}).get("train", ())
        unknown = sorted(set(train_inputs) - set(TRAIN_INPUTS))
        if unknown:
            raise ArtifactError(f"the trainable artifact's train step takes {', '.join(unknown)}, which this agent "
                                f"does not know: update the device agent to one as new as the exporting edgekit")
        self.has_momentum = "momentum" in train_inputs
        self.has_dropout = "dropout" in train_inputs
        # the uniform draws of one step's dropout masks (an artifact exported before it draws its own at random)
        self.noise_size = self._noise_size() if "dropout_noise" in train_inputs else 0
        dtype = str(spec.get("input", {}).get("dtype", "float32"))
        if dtype not in ("float32", "int32", "int64"):
            raise ArtifactError(f"the trainable artifact's input dtype {dtype!r} is not float32, int32 or int64")
        self.input_dtype = np.dtype(dtype)  # token ids of a text model (its backbone's or its Embedding's input)
        # what the train/infer signatures take: the backbone's float features, else the model's own input
        self._x_dtype = np.dtype(np.int32) if self._backbone is None and dtype != "float32" else np.dtype(np.float32)

    def _noise_size(self) -> int:
        details = self._train.get_input_details().get("dropout_noise")
        if details is None or len(details["shape"]) != 1:
            raise ArtifactError("the trainable artifact's manifest lists a dropout_noise input its train step lacks")
        return int(details["shape"][0])

    @classmethod
    def from_bytes(cls, data: bytes, manifest: dict[str, Any], **kwargs: Any) -> Trainer:
        return cls(data, manifest, **kwargs)

    @classmethod
    def load(cls, folder: str | Path, **kwargs: Any) -> Trainer:
        """Load from an ``edgekit trainable`` output folder, checking every SHA-256 first."""
        manifest = read_manifest(folder)
        if manifest.get("kind") != "trainable":
            raise ArtifactError(f"{folder} holds a {manifest.get('kind', '?')} artifact, not a trainable one")
        files = {e.get("role", "trainable"): check_entry(folder, e) for e in manifest["artifacts"]}
        return cls(files["trainable"], manifest, backbone=files.get("backbone"), **kwargs)

    # -- weights -------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """Current weights by tensor name (copies)."""
        return {k: np.array(v) for k, v in self._get().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Replace every weight (also the FedProx anchor); names and shapes must match the manifest."""
        missing = set(self.tensors) - set(weights)
        extra = set(weights) - set(self.tensors)
        if missing or extra:
            raise InputMismatchError(f"set_weights: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        feed = {}
        for name, shape in self.tensors.items():
            value = np.asarray(weights[name], dtype=np.float32)
            if value.shape != shape:
                raise InputMismatchError(f"set_weights: {name} has shape {value.shape}, expected {shape}")
            if not np.isfinite(value).all():
                raise InputMismatchError(f"set_weights: {name} holds NaN/inf")
            feed[name] = value
        self._set(**feed)

    # -- data ----------------------------------------------------------------------------------
    def features(self, x: np.ndarray) -> np.ndarray:
        """Backbone features for head-only training (the input itself in full mode)."""
        x = np.asarray(x, dtype=self.input_dtype)
        return self._backbone.predict(x) if self._backbone is not None else x

    def _check(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        want = tuple(self.spec["input"]["shape"][1:])
        if tuple(x.shape[1:]) != want:
            raise InputMismatchError(f"x has shape {x.shape}, the model expects (n, {', '.join(map(str, want))})")
        if y is not None and len(y) and (y.min() < 0 or y.max() >= self.num_classes):  # one per sample: class_labels
            raise InputMismatchError(f"labels must be in 0..{self.num_classes - 1}")

    # -- training ------------------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray, *, learning_rate: float, mu: float = 0.0,
                   momentum: float = 0.0, sample_weight: np.ndarray | None = None, dropout: float = 1.0,
                   rng: np.random.Generator | None = None) -> float:
        """One SGD step on exactly one batch (already features in head-only mode); returns the loss.

        ``momentum``: heavy-ball momentum in [0, 1); its velocity lives in the artifact and is zeroed by
        :meth:`set_weights`. ``dropout`` scales the rates of the model's Dropout layers: 1 drops units as Keras's
        training mode does (a fresh mask every step, drawn from ``rng``, or at random without it; :meth:`predict`
        never drops), 0 keeps every unit (an artifact exported before the train signature had a dropout input
        trains with them off; one exported before it had ``dropout_noise`` draws its masks at random).
        """
        if not 0 <= dropout <= 1:
            raise InputMismatchError(f"dropout must be in [0, 1], got {dropout}")
        if sample_weight is None:
            sample_weight = np.ones(len(x), np.float32)
        momentum = self._momentum(momentum)
        extra: dict[str, np.ndarray] = {"momentum": np.float32(momentum)} if self.has_momentum else {}
        if self.has_dropout:
            extra["dropout"] = np.float32(dropout)
        if self.noise_size:  # with dropout off every unit is kept whatever the draws
            extra["dropout_noise"] = (np.zeros(self.noise_size, np.float32) if dropout == 0 else
                                      (rng or np.random.default_rng()).random(self.noise_size, dtype=np.float32))
        out = self._train(x=np.asarray(x, self._x_dtype), y=np.asarray(y, np.int32),
                          sample_weight=np.asarray(sample_weight, np.float32),
                          learning_rate=np.float32(learning_rate), mu=np.float32(mu), **extra)
        return float(out["loss"])

    def _momentum(self, momentum: float) -> float:
        """``momentum``, checked: in [0, 1), and 0 for an artifact without the input."""
        if not 0 <= momentum < 1:
            raise InputMismatchError(f"momentum must be in [0, 1), got {momentum}")
        if momentum and not self.has_momentum:
            raise TrainingError(f"this trainable artifact has no momentum input (exported before it had one): "
                                f"re-export it to train with momentum {momentum:g}, or use 0")
        return momentum

    def fit(self, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, learning_rate: float | None = None,
            mu: float = 0.0, momentum: float = 0.0, seed: int = 0, frozen: Collection[str] = ()) -> list[float]:
        """Train on ``x, y`` for ``epochs``; the last short batch is padded with weight-0 samples.

        ``frozen``: tensors put back after every step (e.g. the backbone, to train only the head:
        the manifest's ``head_tensors``); putting them back zeroes the momentum, so with ``frozen`` the
        steps are plain SGD. ``momentum``: heavy-ball momentum in [0, 1), carried across the epochs.
        Returns the mean loss of each epoch.
        """
        feats, y = self._training_data(x, y)
        return self._fit_features(feats, y, epochs=epochs, learning_rate=self._rate(learning_rate), mu=mu,
                                  momentum=momentum, seed=seed, frozen=frozen)

    def _training_data(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, int32 labels) of a training set, checked (:mod:`device_agents.training.samples`)."""
        x, y = self._labelled(x, y, "training data")
        return self.features(x), y.astype(np.int32)

    def _labelled(self, x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        """``x`` in the model's dtype and ``y`` as class ids, checked: finite numeric samples, one label each."""
        x = np.asarray(x)
        check_samples(x, what)
        y = class_labels(y, len(x), what)
        x = x.astype(self.input_dtype)
        self._check(x, y)
        return x, y

    def _rate(self, learning_rate: float | None) -> float:
        return float(self.spec.get("learning_rate", 0.05) if learning_rate is None else learning_rate)

    def _fit_features(self, feats: np.ndarray, y: np.ndarray, *, epochs: int, learning_rate: float, mu: float,
                      momentum: float, seed: int, frozen: Collection[str]) -> list[float]:
        rng = np.random.default_rng(seed)  # the batch order
        masks = np.random.default_rng([seed, 1])  # the dropout draws: a stream of their own, beside the order
        b = self.batch_size
        losses = []
        kept = {k: v for k, v in self.get_weights().items() if k in set(frozen)}
        for _ in range(epochs):
            order = rng.permutation(len(feats))
            total, weight = 0.0, 0
            for start in range(0, len(feats), b):
                idx = order[start:start + b]
                n = len(idx)
                pad = np.resize(idx, b)  # fill the batch; padded samples weigh 0
                w = np.zeros(b, np.float32)
                w[:n] = 1.0
                loss = self.train_step(feats[pad], y[pad], learning_rate=learning_rate, mu=mu, momentum=momentum,
                                       sample_weight=w, rng=masks)
                if kept:
                    self.set_weights({**self.get_weights(), **kept})
                total += loss * n
                weight += n
            losses.append(total / weight)
        return losses

    def fit_safely(self, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, learning_rate: float | None = None,
                   mu: float = 0.0, momentum: float = 0.0, seed: int = 0,
                   frozen: Collection[str] = ()) -> LocalFit:
        """:meth:`fit`, and when the loss on ``x, y`` ends higher than it started (:attr:`LocalFit.diverged`),
        again from the same weights at half the learning rate, up to :data:`MAX_BACKOFFS` times. When every
        rate diverges, the weights are put back and :class:`TrainingError` says so with the losses.

        A rate chosen for a whole federation can be too large for one device: a converged CNN with frozen
        BatchNormalization, SGD at 0.1 with batches of 8, went from 100% to 9-43% on its own 90 samples for
        5 of 8 batch orders (1 of 8 at 0.05, none at 0.02).

        >>> trainer.fit_safely(x, y, epochs=1, learning_rate=0.1).learning_rate   # doctest: +SKIP
        0.025
        """
        lr = self._rate(learning_rate)
        feats, labels = self._training_data(x, y)  # a head-only device runs its backbone once, not per attempt
        start = self.get_weights()
        before, _ = self._score(self._infer_features(feats), labels)
        ends = []
        for attempt in range(MAX_BACKOFFS + 1):
            if attempt:
                self.set_weights(start)
            rate = lr / 2 ** attempt
            losses = self._fit_features(feats, labels, epochs=epochs, learning_rate=rate, mu=mu, momentum=momentum,
                                        seed=seed, frozen=frozen)
            after, accuracy = self._score(self._infer_features(feats), labels)
            result = LocalFit(losses, rate, before, after, accuracy)
            if not math.isfinite(before) or not result.diverged:
                return result
            ends.append(f"{after:.3g}")
        self.set_weights(start)
        raise TrainingError(f"local training diverged at every learning rate from {lr:g} to {rate:g}: the loss "
                            f"on this device's data rose from {before:.3g} to {', '.join(ends)}; the weights are "
                            "left as they were")

    # -- inference -----------------------------------------------------------------------------
    def predict(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x, dtype=self.input_dtype)
        self._check(x)
        return self._infer_features(self.features(x), batch_size=batch_size)

    def _infer_features(self, feats: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        feats = np.asarray(feats, self._x_dtype)
        outs = [np.array(self._infer(x=feats[i:i + batch_size])["output"]) for i in range(0, len(feats), batch_size)]
        return np.concatenate(outs).astype(np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy in percent) of the current weights."""
        x, y = self._labelled(x, y, "evaluation data")
        return self._score(self.predict(x), y)

    def _score(self, out: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        y = np.asarray(y).astype(np.int64)
        probs = out if self.spec.get("output") == "probabilities" else _softmax(out)
        loss = 0.0 - float(np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-8, 1.0))))  # 0, never -0 ("-0.0000")
        return loss, float(np.mean(out.argmax(1) == y) * 100.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
