"""Output folders written atomically: everything goes to a temporary sibling, renamed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgekit.errors import OutputError

_MARKERS = ("manifest.json", "report.md")


def check_output_dir(out: str | Path) -> Path:
    """Refuse, before any work starts, an output folder that cannot be written or replaced.

    An existing folder is replaced only when it is empty or an earlier edgekit output.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in _MARKERS):
        raise OutputError(f"--out {out} is a non-empty folder that edgekit did not write; "
                          "give a new or empty folder")
    parent = out.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write --out {out}: {existing} is not writable; choose another folder")
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
            raise OutputError(f"cannot write --out {self.out}: {exc.strerror}; choose another folder") from None
        self._committed = False

    def __enter__(self) -> StagedDir:
        return self

    def commit(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write one file via a temporary sibling and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
