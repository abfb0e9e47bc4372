"""Output folders written atomically, with an ownership marker, and file hashing: the one copy of each
mechanism on the server side.

A folder is built in a temporary sibling ``.NAME.partial-PID-*`` and swapped into place in one atomic
step at the end (:class:`StagedDir`; Linux ``renameat2(RENAME_EXCHANGE)``, elsewhere two renames with
recovery). Every folder edgekit writes holds :data:`MARKER`; edgekit replaces or deletes only folders
that hold it, never a folder it did not write. Staging left by a killed run is removed by the next
run. Single files go through :func:`device_agents.files.write_atomic` (temporary sibling, fsync, rename).

Work folders under the system's temporary directory (an exported graph, an ONNX quantizer's models, Ray's session)
are named after the process that made them, ``edgekit-KIND-PID-*`` (:func:`temp_dir`): a process killed before it
could remove its own (SIGKILL, an out-of-memory kill, a power cut) leaves them behind, and the next edgekit process
that makes one removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from device_agents.files import crash_point, fsync_dir, write_atomic
from edgekit.errors import OutputError

__all__ = ["MARKER", "StagedDir", "check_output_dir", "crash_point", "mark_output", "pid_alive",
           "remove_stale_temp_dirs", "sha256_of", "temp_dir", "temporary_dir", "write_atomic"]

MARKER = ".edgekit-output"
"""The file that says edgekit wrote a folder (and may replace it)."""


def mark_output(folder: Path, kind: str) -> None:
    """Write the ownership marker into ``folder``."""
    from edgekit._version import __version__

    write_atomic(folder / MARKER, json.dumps({"written_by": "edgekit", "version": __version__,
                                              "kind": kind}).encode())


def owned(folder: Path) -> bool:
    """True when ``folder`` holds edgekit's marker (a regular file, not a link)."""
    marker = folder / MARKER
    return marker.is_file() and not marker.is_symlink()


def check_output_dir(out: str | Path) -> Path:
    """Refuse, before any work starts, an output folder that cannot be written or replaced.

    An existing folder is replaced only when it is empty or holds edgekit's marker.
    """
    out = Path(out).absolute()
    _recover(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not owned(out):
        raise OutputError(f"output folder {out} is not empty and edgekit did not write it (no {MARKER}); "
                          "give a new or empty folder")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output folder {out}: {existing} is not writable; choose another folder")
    return out


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a folder named after it is then not stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_dir(kind: str) -> Path:
    """A new private (0700) folder ``edgekit-KIND-PID-*`` under the temporary directory, for the caller to remove;
    first, those left by edgekit processes that are gone are removed (:func:`remove_stale_temp_dirs`).

    >>> folder = temp_dir("doc"); folder.name.startswith(f"edgekit-doc-{os.getpid()}-"); shutil.rmtree(folder)
    True
    """
    if not kind.isalnum():
        raise ValueError(f"a temporary folder's kind is one word of letters and digits, not {kind!r}")
    remove_stale_temp_dirs()
    return Path(tempfile.mkdtemp(prefix=f"edgekit-{kind}-{os.getpid()}-"))


@contextlib.contextmanager
def temporary_dir(kind: str) -> Iterator[Path]:
    """:func:`temp_dir`, removed when the block ends."""
    folder = temp_dir(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_temp_dirs() -> None:
    """Remove this user's ``edgekit-KIND-PID-*`` folders (:func:`temp_dir`) whose process no longer runs."""
    for folder in Path(tempfile.gettempdir()).glob("edgekit-*-*-*"):
        parts = folder.name.split("-")
        if len(parts) != 4 or not parts[1].isalnum() or not parts[2].isdigit() or pid_alive(int(parts[2])):
            continue
        try:
            stale = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
        except OSError:  # removed meanwhile
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _recover(out: Path) -> None:
    """Undo what a killed run left beside ``out``: stale staging is removed; a displaced old output
    (killed between the two renames of the fallback commit) is put back."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)(-.*)?$")
    for sibling in out.parent.iterdir():
        match = pattern.match(sibling.name)
        if not match or not sibling.is_dir() or sibling.is_symlink() or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists() and owned(sibling):
            os.rename(sibling, out)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


class StagedDir:
    """A temporary folder beside ``out`` that :meth:`commit` swaps into place atomically.

    Created before any work, so an output that cannot be written is refused at once.

    >>> with StagedDir("out", kind="compress") as stage:          # doctest: +SKIP
    ...     (stage.path / "model.tflite").write_bytes(data)
    ...     stage.commit()
    """

    def __init__(self, out: str | Path, *, kind: str) -> None:
        self.out = check_output_dir(out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-",
                                              dir=self.out.parent))
            os.chmod(self.path, 0o755)
            mark_output(self.path, kind)
        except OSError as exc:
            if hasattr(self, "path"):
                shutil.rmtree(self.path, ignore_errors=True)
            raise OutputError(f"cannot write output folder {self.out}: {exc.strerror or exc}; "
                              "choose another folder") from None
        self._committed = False

    def __enter__(self) -> StagedDir:
        return self

    def commit(self) -> Path:
        """Flush every staged file to disk, then swap the staged folder into place in one step."""
        for file in self.path.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(self.path)
        crash_point("output-staged")
        if self.out.exists():
            if not owned(self.out):  # it changed since the check: never replace what edgekit did not write
                raise OutputError(f"output folder {self.out} was replaced by a folder edgekit did not write; "
                                  f"the result is kept in {self.path}")
            if not _exchange(self.path, self.out):
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.rename(self.out, old)
                crash_point("output-between-renames")
                os.rename(self.path, self.out)
                self.path = old
            shutil.rmtree(self.path, ignore_errors=True)  # now the previous output
        else:
            os.rename(self.path, self.out)
        fsync_dir(self.out.parent)
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
