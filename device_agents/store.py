"""Installed model versions on a device: verify, smoke-test, atomic swap, rollback.

Layout under the store root::

    versions/<id>/manifest.json + artifacts     one folder per installed version (id: sha256 prefix)
    current  -> versions/<id>                   the version serving now (a symlink, swapped atomically)
    previous -> versions/<id>                   the last good version, for rollback

>>> store = ModelStore("/var/lib/edgekit")     # doctest: +SKIP
>>> store.install("out")                       # doctest: +SKIP
>>> store.rollback()                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from device_agents.errors import AgentError, InstallError
from device_agents.integrity import check_folder, read_manifest, verified_artifact
from device_agents.runtime import Model


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    @property
    def current(self) -> Path | None:
        return self._link("current")

    @property
    def previous(self) -> Path | None:
        return self._link("previous")

    def install(self, folder: str | Path, *, runtime: str | None = None) -> Path:
        """Verify ``folder`` (hashes), copy it beside the current version, smoke-test, then swap.

        On any failure the current version stays active and nothing new is left behind.
        """
        folder = Path(folder)
        try:
            manifest = read_manifest(folder)
            entries = check_folder(folder)
        except AgentError as exc:
            raise InstallError(f"refusing {folder}: {exc}") from None
        version = (entries[0].sha256 if entries else "empty")[:16]
        self.versions.mkdir(parents=True, exist_ok=True)
        target = self.versions / version
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.versions))
        try:
            for name in ["manifest.json", *(e.path.name for e in entries)]:
                shutil.copy2(folder / name, staging / name)
            _smoke_test(staging, manifest, runtime)
            if target.exists():
                shutil.rmtree(staging)
            else:
                os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        current = self.current
        if current is not None and current != target.resolve():
            self._swap("previous", current)
        self._swap("current", target)
        return target

    def rollback(self) -> Path:
        """Make the previous version current again (and the current one previous)."""
        previous, current = self.previous, self.current
        if previous is None:
            raise InstallError(f"no previous version to roll back to in {self.root}")
        self._swap("current", previous)
        if current is not None:
            self._swap("previous", current)
        return previous

    def _swap(self, name: str, target: Path) -> None:
        link = self.root / name
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, link)  # atomic on POSIX


def _smoke_test(folder: Path, manifest: dict, runtime: str | None) -> None:
    """Load the artifact, run one sample, require finite outputs."""
    try:
        if manifest.get("kind") == "trainable":
            from device_agents.training import Trainer

            trainer = Trainer.load(folder, runtime=runtime)
            shape = [1, *trainer.spec["input"]["shape"][1:]]
            out = trainer.predict(np.zeros(shape, np.float32))
        else:
            entry = verified_artifact(folder, runtime=runtime)
            model = Model.load(entry.path, runtime=runtime)
            out = model.predict(model.example_input())
    except AgentError as exc:
        raise InstallError(f"the new version failed its smoke test: {exc}") from None
    if not np.isfinite(out).all():
        raise InstallError("the new version failed its smoke test: non-finite outputs")
