"""Durable, atomic file writes: the one copy of the mechanism, for the device and the server.

A file is written to a temporary sibling, flushed and fsynced, renamed over the target, and the
folder is fsynced, so a crash leaves either the old file or the new one, never a mix.

>>> write_atomic("telemetry.json", b"{}")        # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def crash_point(name: str) -> None:
    """Fault injection for crash-safety tests: SIGKILL this process here when ``EDGEKIT_CRASH_AT`` is ``name``."""
    if os.environ.get("EDGEKIT_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (created if missing), held by ``flock`` on its ``.lock`` file: one writer
    at a time among processes (the model store's installs, a telemetry spool's writers)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomic(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically and durably, created with permissions ``mode``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


# --- bounded reads of untrusted files --------------------------------------------------------------

MAX_ARRAY_BYTES = 2 * 1024**3
"""The server's limit (edgekit's data loading): the most an ``.npz`` may expand to in memory, all its arrays
together, unless the environment variable ``EDGEKIT_MAX_ARRAY_BYTES`` sets another number of bytes."""
DEVICE_MAX_ARRAY_BYTES = 256 * 1024**2
"""The device agent's limit (a phone, a Raspberry Pi): what :func:`read_npz` allows by default, unless
``EDGEKIT_MAX_ARRAY_BYTES`` says otherwise (see :func:`max_array_bytes`)."""
MAX_ARTIFACT_BYTES = 2 * 1024**3
"""The largest model artifact read (a TFLite flatbuffer cannot exceed 2 GiB)."""
MAX_MANIFEST_BYTES = 16 * 1024**2
"""The largest ``manifest.json`` parsed."""

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


class UnsafeFileError(ValueError):
    """A file is not what it claims, or would take more memory than the documented limit.

    Callers turn it into their own error type (``DataError``, ``InputMismatchError``...).
    """


def describe_file(path: Path, head: bytes) -> str:
    """What a file that is not the expected format looks like, for an error message."""
    if head.startswith(_NPY_MAGIC):
        return "a single .npy array"
    if head[:1] in (b"{", b"["):
        return "a JSON file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of another format"
    return "a text file (CSV?)" if b"," in head or b";" in head or b"\t" in head else "a text file"


def max_array_bytes(default: int = DEVICE_MAX_ARRAY_BYTES) -> int:
    """The limit in force: ``EDGEKIT_MAX_ARRAY_BYTES`` when set to a positive integer, else ``default`` (the
    device's :data:`DEVICE_MAX_ARRAY_BYTES`; the server passes :data:`MAX_ARRAY_BYTES`)."""
    import os

    try:
        value = int(os.environ.get("EDGEKIT_MAX_ARRAY_BYTES", default))
    except ValueError:
        return default
    return value if value > 0 else default


def _archive_kind(path: str | Path, single_array: str | None) -> str:
    """``"npz"`` (a zip archive, what ``numpy.savez`` writes) or, where ``single_array`` names what a lone array is
    read as, ``"npy"`` (``numpy.save``), judged from the file's first bytes; else :class:`UnsafeFileError`."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if single_array is not None and head.startswith(_NPY_MAGIC):
        return "npy"
    raise UnsafeFileError(f"{path} is {describe_file(path, head)}, not an .npz archive; "
                          "write it with numpy.savez(path, x=..., y=...)")


@contextmanager
def _arrays(path: Path, single_array: str | None) -> Iterator[dict[str, tuple[Any, int]]]:
    """Name -> (a function opening a stream at that array's ``.npy`` bytes, their stored size) for an ``.npz``'s
    members, or for a single ``.npy`` file (read as ``single_array``)."""
    import zipfile

    if _archive_kind(path, single_array) == "npy":
        yield {single_array: (lambda: open(path, "rb"), path.stat().st_size)}
        return
    with zipfile.ZipFile(path) as archive:
        yield {info.filename.removesuffix(".npy"): (lambda info=info: archive.open(info), info.file_size)
               for info in archive.infolist()}


def _header(stream: Any) -> tuple[tuple[int, ...], bool, Any]:
    import numpy as np

    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def _unreadable(path: Path, exc: BaseException, single_array: str | None) -> UnsafeFileError:
    from device_agents.errors import first_line

    what = ".npz (or .npy)" if single_array is not None else ".npz"
    return UnsafeFileError(f"{path} is not a readable {what} file ({first_line(exc, limit=160)}); "
                           "write it with numpy.savez")


def npz_names(path: str | Path) -> set[str]:
    """The array names of an ``.npz`` (none for a file that is not a zip archive: reading it says what it is)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile):
        return set()


def read_npz(path: str | Path, *, names: tuple[str, ...], max_bytes: int | None = None,
             single_array: str | None = None) -> dict:
    """Read arrays ``names`` (those present) of an ``.npz`` file, checking sizes before any allocation;
    with ``single_array``, a single ``.npy`` array is read too, as that name.

    Every array's header (shape x itemsize) and the zip member's declared size are checked against
    ``max_bytes`` (all arrays together) before reading; object arrays are refused (no pickle); a
    member that decompresses to less than its header declares is refused as corrupt. Raises
    :class:`UnsafeFileError` with a one-line reason.
    """
    import zipfile

    import numpy as np

    path = Path(path)
    max_bytes = max_array_bytes() if max_bytes is None else max_bytes
    arrays, total = {}, 0
    try:
        with _arrays(path, single_array) as members:
            for name in names:
                if name not in members:
                    continue
                opener, stored = members[name]
                with opener() as member:
                    shape, _, dtype = _header(member)
                if dtype.hasobject:
                    raise UnsafeFileError(f"{path}: array '{name}' holds Python objects ({dtype}); "
                                          "only numeric arrays are read (no pickle)")
                need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                total += max(need, stored)
                if total > max_bytes:
                    raise UnsafeFileError(
                        f"{path}: array '{name}' declares shape {tuple(shape)} of {dtype} ({need / 2**20:,.0f} MiB, "
                        f"{stored / 2**20:,.0f} MiB unpacked); the limit is {max_bytes / 2**20:,.0f} MiB "
                        "for all arrays together (EDGEKIT_MAX_ARRAY_BYTES)")
                with opener() as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except UnsafeFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise _unreadable(path, exc, single_array) from None
    return arrays


def iter_npz_rows(path: str | Path, name: str, *, batch_rows: int, max_bytes: int | None = None,
                  single_array: str | None = None) -> tuple[tuple[int, ...], Any, Iterator[Any]]:
    """(shape, dtype, batches) of array ``name`` of an ``.npz`` (or, with ``single_array``, of a single ``.npy``
    array read as that name), read ``batch_rows`` rows at a time: memory stays at one batch whatever the
    array's size. The header is checked as :func:`read_npz` checks it (no objects; the declared size within
    ``max_bytes``); a Fortran-ordered array is read whole, within the limit. Raises :class:`UnsafeFileError`;
    an archive without ``name`` gives shape ``()`` and no batches."""
    import zipfile
    from contextlib import ExitStack

    import numpy as np

    path = Path(path)
    limit = max_array_bytes() if max_bytes is None else max_bytes
    stack = ExitStack()
    try:
        members = stack.enter_context(_arrays(path, single_array))
        if name not in members:
            stack.close()
            return (), None, iter(())
        member = stack.enter_context(members[name][0]())
        shape, fortran, dtype = _header(member)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        stack.close()
        raise _unreadable(path, exc, single_array) from None
    except UnsafeFileError:
        stack.close()
        raise
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or need > limit or not shape:
        stack.close()
        if dtype.hasobject:
            raise UnsafeFileError(f"{path}: array '{name}' holds Python objects ({dtype}); only numeric arrays are "
                                  "read (no pickle)")
        if not shape:
            raise UnsafeFileError(f"{path}: array '{name}' is a scalar, not rows of samples")
        raise UnsafeFileError(f"{path}: array '{name}' declares shape {tuple(shape)} of {dtype} ({need / 2**20:,.0f} "
                              f"MiB); the limit is {limit / 2**20:,.0f} MiB (EDGEKIT_MAX_ARRAY_BYTES)")
    if fortran:
        stack.close()
        whole = read_npz(path, names=(name,), max_bytes=limit, single_array=single_array)[name]
        return tuple(shape), dtype, (whole[i:i + batch_rows] for i in range(0, len(whole), batch_rows))
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def batches() -> Iterator[Any]:
        with stack:
            for start in range(0, shape[0], batch_rows):
                rows = min(batch_rows, shape[0] - start)
                data = member.read(rows * row)
                if len(data) != rows * row:
                    raise UnsafeFileError(f"{path}: array '{name}' ends after {start} of its {shape[0]} rows "
                                          "(truncated or corrupt)")
                yield np.frombuffer(data, dtype=dtype).reshape((rows, *shape[1:]))

    return tuple(shape), dtype, batches()


def read_bounded(path: str | Path, *, max_bytes: int, what: str) -> bytes:
    """Read a whole file of at most ``max_bytes`` (checked before reading, and while reading)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UnsafeFileError(f"{path} has {size:,} bytes, more than the {max_bytes:,} a {what} may have")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{path} grew past {max_bytes:,} bytes while it was read")
    return data
