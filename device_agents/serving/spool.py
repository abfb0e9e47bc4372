"""A bounded, crash-safe spool of serving-statistics windows in a folder (the store's ``telemetry/``).

Each window is one JSON file, ``<sequence>.json``, written atomically (a crash leaves the previous files whole and
at most a temporary file, which is ignored and cleared); when the files pass ``max_bytes`` the oldest are deleted,
so a device that serves for weeks offline keeps a bounded summary of its most recent windows. Writers take a lock
on the folder. Reading skips (and reports) a file that is not a valid window: the spool is read as untrusted.

A spool has an identity (:meth:`Spool.identity`, a random id in ``spool.json`` beside the windows, with the next
sequence to write): sequences never restart, even when every window was collected and drained, and a store
that was wiped (or a device re-provisioned with the same node key) starts a spool of another id, so the server,
which stores windows per (node, spool, sequence), neither drops the new windows as already stored nor makes the
device drain windows it never collected.

>>> spool = Spool(store_root / "telemetry", max_bytes=1 << 20)     # doctest: +SKIP
>>> spool.append(stats)                                             # doctest: +SKIP
>>> [w.calls for w in spool.windows()]                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from device_agents.errors import StatsError
from device_agents.files import UnsafeFileError, locked, read_bounded, write_atomic
from device_agents.serving.stats import ServingStats

DEFAULT_SPOOL_BYTES = 1 << 20
"""The spool's size at most (1 MiB): about a thousand windows of a 10-class model with a few features."""
SUFFIX = ".json"
IDENTITY = "spool.json"
"""The spool's identity file: ``{"id": <16 hex digits>, "next": <the next sequence to write>}``."""
MAX_SEQUENCE = 10 ** 12 - 1


def valid_id(value: object) -> bool:
    """Whether ``value`` is a spool id: 16 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)


class Spool:
    """A folder of serving-statistics windows, at most ``max_bytes`` in all, oldest dropped first."""

    def __init__(self, folder: str | Path, *, max_bytes: int = DEFAULT_SPOOL_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"a spool holds a positive number of bytes, not {max_bytes}")
        self.folder, self.max_bytes = Path(folder), int(max_bytes)

    def files(self) -> list[tuple[int, Path]]:
        """(sequence, path) of every window file, oldest first (other names are not the spool's)."""
        found = []
        for path in self.folder.glob(f"*{SUFFIX}") if self.folder.is_dir() else []:
            stem = path.name[:-len(SUFFIX)]
            if stem.isdigit() and len(stem) == 12 and path.is_file() and not path.is_symlink():
                found.append((int(stem), path))
        return sorted(found)

    def append(self, stats: ServingStats) -> Path | None:
        """Write ``stats`` as the newest window and drop the oldest beyond ``max_bytes``; ``None`` for an empty
        window (nothing served). A window larger than the whole spool is refused (:class:`ValueError`)."""
        if stats.empty:
            return None
        data = (json.dumps(stats.to_dict(), separators=(",", ":")) + "\n").encode()
        if len(data) > self.max_bytes:
            raise ValueError(f"a serving-statistics window of {len(data):,} bytes does not fit a spool of "
                             f"{self.max_bytes:,} bytes")
        with locked(self.folder):
            for stale in self.folder.glob(".*.partial"):  # a writer that crashed mid-write (none runs: locked)
                stale.unlink(missing_ok=True)
            files = self.files()
            spool_id, following, _ = self._identity()
            sequence = max(following, files[-1][0] + 1 if files else 1)
            if sequence > MAX_SEQUENCE:  # a trillion windows: a new spool (the server sees a new id)
                spool_id, sequence = secrets.token_hex(8), 1
            path = self.folder / f"{sequence:012d}{SUFFIX}"
            write_atomic(path, data)
            self._write_identity(spool_id, sequence + 1)
            self._trim([*files, (0, path)])
        return path

    def identity(self) -> str:
        """The spool's id (made, with its identity file, when the spool has none or a malformed one)."""
        with locked(self.folder):
            spool_id, following, stored = self._identity()
            if not stored:
                self._write_identity(spool_id, following)
        return spool_id

    def _identity(self) -> tuple[str, int, bool]:
        """(id, next sequence, whether the file holds them) from the identity file; a missing or malformed one is
        a new spool (a new id, and sequences after the windows it holds). Called under the lock."""
        try:
            data = json.loads(read_bounded(self.folder / IDENTITY, max_bytes=4096, what="spool identity"))
            spool_id, following = data["id"], data["next"]
            if valid_id(spool_id) and isinstance(following, int) and not isinstance(following, bool) \
                    and 1 <= following <= MAX_SEQUENCE + 1:
                return spool_id, following, True
        except (OSError, ValueError, KeyError, TypeError, UnsafeFileError):
            pass
        files = self.files()
        return secrets.token_hex(8), (files[-1][0] + 1 if files else 1), False

    def _write_identity(self, spool_id: str, following: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / IDENTITY, json.dumps({"id": spool_id, "next": following}).encode())

    def _trim(self, files: list[tuple[int, Path]]) -> None:
        sizes = [(path, path.stat().st_size) for _, path in files]
        total = sum(size for _, size in sizes)
        for path, size in sizes:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def bytes(self) -> int:
        """The window files' total size."""
        return sum(path.stat().st_size for _, path in self.files())

    @staticmethod
    def parse(data: bytes) -> ServingStats | None:
        """The window in ``data``, or ``None`` when it is not one."""
        try:
            return ServingStats.from_dict(json.loads(data))
        except (ValueError, StatsError):
            return None

    def windows(self, *, problems: list[str] | None = None) -> list[ServingStats]:
        """Every valid window, oldest first; a file that is not one is skipped (its name and why are appended to
        ``problems``)."""
        found = []
        for _, path in self.files():
            try:
                if path.stat().st_size > self.max_bytes:
                    raise StatsError(f"larger than the spool ({self.max_bytes:,} bytes)")
                found.append(ServingStats.from_dict(json.loads(path.read_bytes())))
            except (OSError, ValueError, StatsError) as exc:
                if problems is not None:
                    problems.append(f"{path.name}: {exc}")
        return found

    def drain(self, through: int) -> None:
        """Delete the windows up to sequence ``through`` (once collected)."""
        with locked(self.folder):
            for sequence, path in self.files():
                if sequence <= through:
                    path.unlink(missing_ok=True)

    def last_sequence(self) -> int:
        files = self.files()
        return files[-1][0] if files else 0
