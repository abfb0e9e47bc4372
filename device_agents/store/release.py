"""Signed releases, device side: a release is TUF targets metadata, verified against a trusted key.

A release folder is an edgekit output folder (``manifest.json`` and the artifacts it lists) plus
``release.json``: TUF targets metadata (python-tuf's Metadata API, TUF specification 1.0), signed with
Ed25519 over its canonical JSON. Its ``version`` is the release version, its ``expires`` the date after
which no device accepts it, and its ``targets`` list ``manifest.json`` and every artifact with length and
SHA-256, so the one signature binds every artifact, the recipe and measured accuracy the manifest records,
and the version. The ``custom`` field of the ``manifest.json`` target repeats kind, recipe and accuracy for
readers (``edgekit fleet status``); the manifest's own bytes are what is checked.

Checks, in order (:func:`verify_release`, :func:`check_manifest`): the file is at most 1 MiB of valid
targets metadata; a signature by the trusted key verifies; it has not expired; ``manifest.json`` has the
signed length and SHA-256; the manifest's artifacts are exactly the other targets, with the same sizes
and hashes (each artifact is then hashed as it is copied, :mod:`device_agents.serving.integrity`).

>>> key = load_public_key("signing.pub")              # doctest: +SKIP
>>> release = verify_release("out", key)               # doctest: +SKIP
>>> release.version, release.id                        # doctest: +SKIP
(3, '9c1f0e...')
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from device_agents.errors import ReleaseError, first_line
from device_agents.files import UnsafeFileError, read_bounded
from device_agents.serving.integrity import MANIFEST, parse_manifest

RELEASE = "release.json"
"""The signed release metadata in a release folder (TUF targets metadata)."""
MAX_RELEASE_BYTES = 1 << 20
MAX_KEY_BYTES = 64 << 10


@dataclass(frozen=True)
class Release:
    """A verified release: its version, expiry, signing key id, signed targets and exact bytes."""

    version: int
    expires: datetime
    keyid: str
    targets: dict[str, tuple[int, str]]  # file -> (length, sha256)
    custom: dict[str, Any]
    data: bytes = field(repr=False)

    @property
    def id(self) -> str:
        """The store's name for this release: the first 16 hex digits of the signed metadata's SHA-256."""
        return hashlib.sha256(self.data).hexdigest()[:16]


def release_number(data: bytes) -> int | None:
    """The release number in a release's signed metadata (its ``release.json`` bytes; None: unreadable)."""
    try:
        version = json.loads(data)["signed"]["version"]
    except (ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def load_public_key(path: str | Path) -> Any:
    """The Ed25519 public key (PEM) at ``path`` as a securesystemslib key, or :class:`ReleaseError`."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.signer import SSlibKey

    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"trusted key {path} does not exist; give the signing.pub of `edgekit keys new`")
    try:
        key = load_pem_public_key(read_bounded(path, max_bytes=MAX_KEY_BYTES, what="public key"))
    except (ValueError, TypeError, UnsafeFileError) as exc:
        raise ReleaseError(f"{path} is not a PEM public key ({first_line(exc, limit=80)}); give the "
                           "signing.pub of `edgekit keys new`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 public key; releases are "
                           "signed with Ed25519 keys from `edgekit keys new`")
    return SSlibKey.from_crypto(key)


def key_id(key: Any) -> str:
    """The TUF key id of a securesystemslib key (SHA-256 of its canonical form), for messages and pins."""
    return str(key.keyid)


def verify_targets(data: bytes, key: Any, *, where: str, what: str, now: datetime | None = None) -> Any:
    """The signed part of TUF targets metadata ``data`` (read from ``where``), after checking that ``key``
    signed it and that it has not expired; :class:`ReleaseError` otherwise. ``what`` names it in messages."""
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import TOP_LEVEL_ROLE_NAMES, Metadata, Role, Root

    try:
        metadata = Metadata.from_bytes(data)
    except Exception as exc:  # noqa: BLE001 (any parse failure of untrusted bytes is one refusal)
        raise ReleaseError(f"{where} is not valid {what} metadata ({first_line(exc, limit=100)})") from None
    signed = metadata.signed
    if signed.type != "targets":
        raise ReleaseError(f"{where} holds TUF {signed.type} metadata, not a {what} (targets)")
    trust = Root(keys={key.keyid: key}, roles={name: Role([key.keyid], 1) for name in TOP_LEVEL_ROLE_NAMES})
    try:
        trust.verify_delegate("targets", metadata.signed_bytes, metadata.signatures)
    except UnsignedMetadataError:
        signers = ", ".join(k[:12] for k in metadata.signatures) or "none"
        raise ReleaseError(f"{where}: no valid signature by the trusted key {key.keyid[:12]} (signatures by: "
                           f"{signers}); the {what} was altered or signed with another key") from None
    if signed.is_expired(now or datetime.now(timezone.utc)):
        raise ReleaseError(f"{what} {signed.version} expired on {signed.expires:%Y-%m-%d %H:%M} UTC; "
                           f"sign a new {what} (or check this device's clock)")
    return signed


def verify_release(folder: str | Path, key: Any, *, now: datetime | None = None) -> Release:
    """Read ``folder/release.json`` and verify it was signed by ``key`` and has not expired."""
    path = Path(folder) / RELEASE
    if not path.is_file():
        raise ReleaseError(f"{folder} is not a signed release (no {RELEASE}); sign it with `edgekit release`")
    try:
        data = read_bounded(path, max_bytes=MAX_RELEASE_BYTES, what="release metadata")
    except UnsafeFileError as exc:
        raise ReleaseError(f"{path} is not valid release metadata ({first_line(exc, limit=100)})") from None
    signed = verify_targets(data, key, where=str(path), what="release", now=now)
    targets: dict[str, tuple[int, str]] = {}
    for name, target in signed.targets.items():
        digest = target.hashes.get("sha256")
        if not isinstance(digest, str) or Path(name).name != name:
            raise ReleaseError(f"{path}: target {name!r} has no sha256 or is not a plain file name")
        targets[name] = (int(target.length), digest)
    if MANIFEST not in targets:
        raise ReleaseError(f"{path} does not sign a {MANIFEST}; it is not an edgekit release")
    custom = signed.targets[MANIFEST].unrecognized_fields.get("custom", {})
    return Release(int(signed.version), signed.expires, key.keyid, targets,
                   custom if isinstance(custom, dict) else {}, data)


def check_manifest(release: Release, manifest_bytes: bytes) -> dict[str, Any]:
    """The manifest, after checking its bytes and its artifact list against the signed targets."""
    length, digest = release.targets[MANIFEST]
    if len(manifest_bytes) != length or hashlib.sha256(manifest_bytes).hexdigest() != digest:
        raise ReleaseError(f"{MANIFEST} is not the one release {release.version} signed (sha256 "
                           f"{hashlib.sha256(manifest_bytes).hexdigest()[:12]}... != {digest[:12]}...); refusing it")
    manifest = parse_manifest(manifest_bytes, MANIFEST)
    listed = {entry["file"]: (entry["bytes"], entry["sha256"]) for entry in manifest["artifacts"]}
    signed = {name: value for name, value in release.targets.items() if name != MANIFEST}
    if listed != signed:
        differ = sorted(set(listed) ^ set(signed)) or sorted(n for n in listed if listed[n] != signed.get(n))
        raise ReleaseError(f"the manifest's artifacts are not the ones release {release.version} signed "
                           f"(differ: {', '.join(differ[:3])}); refusing it")
    return manifest
