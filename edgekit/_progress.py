"""Progress bars for long steps (tqdm on stderr), switched off for quiet library use."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """Makes tqdm bars when ``enabled``; otherwise bars that do nothing."""

    enabled: bool = True

    def bar(self, total: int, desc: str, unit: str = "it") -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                    disable=not self.enabled, dynamic_ncols=True)

    @contextmanager
    def step(self, desc: str):  # noqa: ANN201
        """A one-tick bar for a step that reports no progress of its own (a conversion)."""
        bar = self.bar(1, desc)
        try:
            yield
        finally:
            bar.update(1)
            bar.close()

    def keras_callback(self, epochs: int, steps: int, desc: str) -> Any:
        """A tf-keras callback that advances one bar over all batches of ``epochs``."""
        from edgekit import _tf

        progress = self

        class _Bar(_tf.keras().callbacks.Callback):
            def on_train_begin(self, logs: dict | None = None) -> None:
                self.bar = progress.bar(epochs * steps, desc, unit="step")

            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                self.bar.update(1)
                if logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

            def on_train_end(self, logs: dict | None = None) -> None:
                self.bar.close()

        return _Bar()


QUIET = Progress(enabled=False)
