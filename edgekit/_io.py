"""Output folders written atomically, and file hashing: the one copy of each mechanism on the server side.

A folder is built in a temporary sibling and renamed into place at the end (:class:`StagedDir`);
single files go through :func:`device_agents.files.write_atomic` (temporary sibling, fsync, rename),
the same code the device uses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from device_agents.files import fsync_dir, write_atomic
from edgekit.errors import OutputError

__all__ = ["StagedDir", "check_output_dir", "sha256_of", "write_atomic"]

_MARKERS = ("manifest.json", "report.md")


def check_output_dir(out: str | Path) -> Path:
    """Refuse, before any work starts, an output folder that cannot be written or replaced.

    An existing folder is replaced only when it is empty or an earlier edgekit output.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in _MARKERS):
        raise OutputError(f"output folder {out} is not empty and edgekit did not write it; "
                          "give a new or empty folder")
    parent = out.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output folder {out}: {existing} is not writable; choose another folder")
    return out


class StagedDir:
    """A temporary folder beside ``out`` that :meth:`commit` renames to ``out``.

    >>> with StagedDir("out") as stage:          # doctest: +SKIP
    ...     (stage.path / "model.tflite").write_bytes(data)
    ...     stage.commit()
    """

    def __init__(self, out: str | Path) -> None:
        self.out = check_output_dir(out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
            os.chmod(self.path, 0o755)
        except OSError as exc:
            raise OutputError(f"cannot write output folder {self.out}: {exc.strerror}; choose another folder") \
                from None
        self._committed = False

    def __enter__(self) -> StagedDir:
        return self

    def commit(self) -> Path:
        """Flush every staged file to disk, then swap the staged folder into place."""
        for file in self.path.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(self.path)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.path, self.out)
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, or of every file of a folder in sorted order (read in 1 MiB chunks)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
