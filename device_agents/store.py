"""Installed model versions on a device: verify, smoke-test, atomic swap, rollback.

Layout under the store root::

    versions/<id>/manifest.json + artifacts     one folder per installed version (id: manifest sha256 prefix)
    current  -> versions/<id>                   the version serving now (a symlink, swapped atomically)
    previous -> versions/<id>                   the last good version, for rollback
    .lock                                       held while a store is changed (one installer at a time)

Every switch (install, rollback) verifies the version it switches to; a version folder that fails its
check is replaced by a fresh copy or refused. A crashed install leaves only a ``versions/.*`` staging
folder, removed by the next install; at most ``keep`` versions besides current and previous are kept.

>>> store = ModelStore("/var/lib/edgekit")     # doctest: +SKIP
>>> store.install("out")                       # doctest: +SKIP
>>> store.rollback()                           # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from device_agents.errors import AgentError, InstallError
from device_agents.files import MAX_MANIFEST_BYTES, crash_point, fsync_dir, read_bounded, write_atomic
from device_agents.integrity import MANIFEST, check_folder, copy_verified, read_manifest, verified_artifact
from device_agents.runtime import Model


class ModelStore:
    """The model versions of one device folder. ``keep``: older versions kept besides current and previous."""

    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        self.root = Path(root).absolute()  # resolved once: links and messages never depend on the cwd
        self.versions = self.root / "versions"
        self.keep = keep

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    @property
    def current(self) -> Path | None:
        return self._link("current")

    @property
    def previous(self) -> Path | None:
        return self._link("previous")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.versions.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def install(self, folder: str | Path, *, runtime: str | None = None) -> Path:
        """Verify ``folder``, copy it beside the current version (hashing the copy), smoke-test, then swap.

        On any failure the current version stays active and nothing new is left behind.
        """
        folder = Path(folder)
        with self._locked():
            self._remove_stale_staging()
            staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=self.versions))
            try:
                manifest_bytes = self._stage(folder, staging)
                crash_point("install-staged")
                _smoke_test(staging, runtime)
                target = self.versions / hashlib.sha256(manifest_bytes).hexdigest()[:16]
                self._place(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            current = self.current
            if current is not None and current != target:
                self._swap("previous", current)
            self._swap("current", target)
            self._prune()
            return target

    def rollback(self) -> Path:
        """Make the previous version current again (and the current one previous), after verifying it."""
        with self._locked():
            previous, current = self.previous, self.current
            if previous is None:
                raise InstallError(f"no previous version to roll back to in {self.root}")
            try:
                check_folder(previous)
            except AgentError as exc:
                raise InstallError(f"the previous version {previous.name} fails its check ({exc}); "
                                   "not switching to it: install a good release instead") from None
            self._swap("current", previous)
            if current is not None:
                self._swap("previous", current)
            return previous

    def _stage(self, folder: Path, staging: Path) -> bytes:
        try:
            manifest = read_manifest(folder)
            manifest_bytes = read_bounded(folder / MANIFEST, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
            for entry in manifest["artifacts"]:
                copy_verified(folder, entry, staging / entry["file"])
        except AgentError as exc:
            raise InstallError(f"refusing {folder}: {exc}") from None
        write_atomic(staging / MANIFEST, manifest_bytes)
        return manifest_bytes

    def _place(self, staging: Path, target: Path) -> None:
        """Put the staged version at ``target``; an existing copy there is kept only if it still verifies."""
        if target.exists():
            try:
                check_folder(target)
                shutil.rmtree(staging)
                return
            except AgentError:  # a corrupted copy of the same version: replace it
                trash = target.with_name(f".trash.{target.name}.{os.getpid()}")
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(staging)
        os.rename(staging, target)
        fsync_dir(self.versions)

    def _remove_stale_staging(self) -> None:
        """Staging and trash folders of installs that crashed (the lock says none is running now)."""
        for path in self.versions.glob(".*"):
            if path.is_dir() and path.name.startswith((".staging.", ".trash.")):
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self) -> None:
        """Keep current, previous and the ``keep`` most recent other versions."""
        pinned = {self.current, self.previous}
        others = sorted((p for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.resolve() not in pinned), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def _swap(self, name: str, target: Path) -> None:
        link = self.root / name
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, link)  # atomic on POSIX
        fsync_dir(self.root)


def _smoke_test(folder: Path, runtime: str | None) -> None:
    """Load the artifact, run one sample, require finite outputs."""
    import numpy as np

    try:
        manifest = read_manifest(folder)
        if manifest.get("kind") == "trainable":
            from device_agents.training import Trainer

            trainer = Trainer.load(folder, runtime=runtime)
            shape = [1, *trainer.spec["input"]["shape"][1:]]
            out = trainer.predict(np.zeros(shape, np.float32))
        else:
            entry = verified_artifact(folder, runtime=runtime)
            model = Model.load(entry.data, runtime=runtime)
            out = model.predict(model.example_input())
    except AgentError as exc:
        raise InstallError(f"the new version failed its smoke test: {exc}") from None
    if not np.isfinite(out).all():
        raise InstallError("the new version failed its smoke test: non-finite outputs")
