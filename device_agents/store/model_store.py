"""Installed model versions on a device: verify, smoke-test, atomic swap, rollback.

Layout under the store root::

    versions/<id>/manifest.json + artifacts     one folder per installed version; id: the first 16 hex
                 (+ release.json when signed)   digits of the SHA-256 of the signed release metadata
                                                (of the manifest for an unsigned install)
    current  -> versions/<id>                   the version serving now (a symlink, swapped atomically)
    previous -> versions/<id>                   the last good version, for rollback
    trusted.pub                                 the release signing key this store is pinned to
    release-version.json                        the highest release version ever installed here
    .lock                                       held while a store is changed (one installer at a time)

Signed releases (:mod:`device_agents.store.release`): a store given a trusted key (``trust=``) pins it at its
first install, and from then on installs only releases signed by that key, each newer than every release
installed before (TUF's rollback protection: a release that was rolled back is not installed again; sign
a new version). ``rollback`` is the one way back to an older version. A store that never had a key
installs unsigned output folders (hash-checked against their manifest), for development.

Every switch (install, rollback) verifies the version it switches to; a version folder that fails its
check is replaced by a fresh copy or refused. A crashed install leaves only a ``versions/.*`` staging
folder, removed by the next install; at most ``keep`` versions besides current and previous are kept.

>>> store = ModelStore("/var/lib/edgekit", trust="signing.pub")     # doctest: +SKIP
>>> store.install("out")                       # doctest: +SKIP
>>> store.rollback()                           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from device_agents.errors import AgentError, InstallError, ReleaseError
from device_agents.files import MAX_MANIFEST_BYTES, crash_point, fsync_dir, locked, read_bounded, write_atomic
from device_agents.serving.integrity import (
    MANIFEST,
    check_folder,
    copy_verified,
    parse_manifest,
    read_manifest,
)
from device_agents.store.isolation import SMOKE_FAILED, probe_folder
from device_agents.store.release import (
    RELEASE,
    Release,
    check_manifest,
    load_public_key,
    release_number,
    verify_release,
)

TRUSTED_KEY = "trusted.pub"
HIGH_WATER = "release-version.json"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # "now" for checks that ignore expiry (explicit rollback)


class ModelStore:
    """The model versions of one device folder. ``keep``: older versions kept besides current and previous;
    ``trust``: the Ed25519 public key (PEM) releases must be signed with (pinned at the first install)."""

    def __init__(self, root: str | Path, *, keep: int = 2, trust: str | Path | None = None) -> None:
        self.root = Path(root).absolute()  # resolved once: links and messages never depend on the cwd
        self.versions = self.root / "versions"
        self.keep = keep
        self.trust = Path(trust) if trust is not None else None

    def trusted_key(self) -> Any | None:
        """The key releases must be signed with: the pinned one, or ``trust`` (which must equal the pin)."""
        pinned = self.root / TRUSTED_KEY
        pin = load_public_key(pinned) if pinned.is_file() else None
        if self.trust is None:
            return pin
        key = load_public_key(self.trust)
        if pin is not None and pin.keyid != key.keyid:
            raise ReleaseError(f"this store is pinned to signing key {pin.keyid[:12]}, not {key.keyid[:12]} "
                               f"({self.trust}); to trust another key, remove {pinned} deliberately first")
        return key

    def newest(self, kind: str) -> Path | None:
        """The version of ``kind`` (``"inference"`` or ``"trainable"``) to use: current if it is one, else
        previous, else the most recently installed other one (None: none installed)."""
        others = sorted((p for p in self.versions.glob("[!.]*") if p.is_dir()), key=lambda p: p.stat().st_mtime,
                        reverse=True) if self.versions.is_dir() else []
        for folder in dict.fromkeys([self.current, self.previous, *others]):
            if folder is None:
                continue
            try:
                if read_manifest(folder).get("kind", "inference") == kind:
                    return folder
            except AgentError:
                continue
        return None

    def release_version(self) -> int | None:
        """The highest release version ever installed in this store (None: no signed release yet)."""
        path = self.root / HIGH_WATER
        if not path.is_file():
            return None
        try:
            version = json.loads(read_bounded(path, max_bytes=4096, what="release record"))["version"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AgentError) as exc:
            raise ReleaseError(f"{path} is unreadable ({exc}); restore it or reinstall the store") from None
        if not isinstance(version, int) or isinstance(version, bool):
            raise ReleaseError(f"{path} does not hold an integer version; restore it or reinstall the store")
        return version

    @staticmethod
    def release_of(folder: Path | None) -> int | None:
        """The signed release number of an installed version folder (None: none, unsigned or unreadable)."""
        if folder is None or not (folder / RELEASE).is_file():
            return None
        return release_number((folder / RELEASE).read_bytes())

    def status(self) -> dict[str, Any]:
        """What this store serves: current and previous version ids, their release versions and kinds."""

        def describe(folder: Path | None) -> dict[str, Any] | None:
            if folder is None:
                return None
            info: dict[str, Any] = {"id": folder.name, "release": None, "kind": None}
            try:
                info["kind"] = read_manifest(folder).get("kind", "inference")
            except AgentError:
                info["kind"] = "unreadable"
            info["release"] = self.release_of(folder)
            return info

        pinned = self.root / TRUSTED_KEY
        return {"current": describe(self.current), "previous": describe(self.previous),
                "highest_release": self.release_version(),
                "trusted_key": load_public_key(pinned).keyid if pinned.is_file() else None}

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
        with locked(self.root):
            yield

    def install(self, folder: str | Path, *, runtime: str | None = None) -> Path:
        """Verify ``folder``, copy it beside the current version (hashing the copy), smoke-test, then swap.

        On any failure the current version stays active and nothing new is left behind.
        """
        folder = Path(folder)
        with self._locked():
            key = self.trusted_key()
            release = self._check_release(folder, key) if key is not None else None
            self._remove_stale_staging()
            staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=self.versions))
            try:
                manifest_bytes = self._stage(folder, staging, release)
                crash_point("install-staged")
                failure = probe_folder(staging, runtime=runtime)  # in a child: a runtime abort kills only it
                if failure is not None:
                    raise InstallError(failure if failure.startswith(SMOKE_FAILED) else f"{SMOKE_FAILED}: {failure}")
                name = release.id if release else hashlib.sha256(manifest_bytes).hexdigest()[:16]
                target = self.versions / name
                self._place(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            current = self.current
            if current is not None and current != target:
                self._swap("previous", current)
            self._swap("current", target)
            if release is not None:
                write_atomic(self.root / HIGH_WATER, json.dumps({"version": release.version,
                                                                 "id": release.id}).encode())
                if not (self.root / TRUSTED_KEY).is_file() and self.trust is not None:
                    write_atomic(self.root / TRUSTED_KEY, read_bounded(self.trust, max_bytes=1 << 16, what="key"))
            self._prune()
            return target

    def _check_release(self, folder: Path, key: Any) -> Release:
        """The verified release in ``folder``, refused when it is not newer than every installed one."""
        release = verify_release(folder, key)
        highest = self.release_version()
        if highest is not None and release.version <= highest:
            raise ReleaseError(f"release {release.version} is not newer than release {highest}, already installed "
                               "on this device; refusing a downgrade (an explicit rollback is the way back)")
        return release

    def rollback(self) -> Path:
        """Make the previous version current again (and the current one previous), after verifying it."""
        if not self.versions.is_dir():  # no store here (a mistyped path): nothing to lock, nothing created
            raise InstallError(f"no previous version to roll back to: {self.root} holds no store")
        with self._locked():
            previous, current = self.previous, self.current
            if previous is None:
                raise InstallError(f"no previous version to roll back to in {self.root}")
            try:
                check_folder(previous)
                key = self.trusted_key()
                if key is not None:  # a pinned store switches only to releases its key signed
                    check_manifest(verify_release(previous, key, now=_EPOCH), (previous / MANIFEST).read_bytes())
            except AgentError as exc:
                raise InstallError(f"the previous version {previous.name} fails its check ({exc}); "
                                   "not switching to it: install a good release instead") from None
            self._swap("current", previous)
            if current is not None:
                self._swap("previous", current)
            return previous

    def _stage(self, folder: Path, staging: Path, release: Release | None) -> bytes:
        """Copy the manifest and its artifacts (hashed as they are copied) into ``staging``; the manifest
        is parsed from the very bytes that were checked against the signed release."""
        try:
            if not (folder / MANIFEST).is_file():
                read_manifest(folder)  # raises the one-line "no manifest" error
            manifest_bytes = read_bounded(folder / MANIFEST, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
            if release is not None:
                manifest = check_manifest(release, manifest_bytes)
            else:
                manifest = parse_manifest(manifest_bytes, folder / MANIFEST)
            for entry in manifest["artifacts"]:
                copy_verified(folder, entry, staging / entry["file"])
        except ReleaseError:
            raise
        except AgentError as exc:
            raise InstallError(f"refusing {folder}: {exc}") from None
        write_atomic(staging / MANIFEST, manifest_bytes)
        if release is not None:
            write_atomic(staging / RELEASE, release.data)
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
