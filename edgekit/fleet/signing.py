"""Signing keys and signed releases: TUF targets metadata (python-tuf) signed with Ed25519.

The format is :mod:`device_agents.store.release`'s (the device verifies what is written here). Why TUF
metadata and not the OpenSSF ``model-signing`` package: ``model-signing`` 1.1 brings 35 packages
(sigstore, pydantic, requests, rich, ...) to every device and has no version or expiry, so it cannot
refuse a downgrade; python-tuf's targets metadata adds two small packages (``tuf``,
``securesystemslib``) to the device, and its ``version`` and ``expires`` are what TUF's rollback and
freeze-attack protection are built on. Keys are plain PEM (PKCS#8 / SubjectPublicKeyInfo), readable
by ``openssl`` and ``cryptography``.

>>> private, public = new_keys("keys")                               # doctest: +SKIP
>>> sign_release("out", "keys/signing.key", version=3)               # doctest: +SKIP
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from device_agents.errors import AgentError
from device_agents.files import read_bounded, write_atomic
from device_agents.serving.integrity import MANIFEST, check_folder, read_manifest
from device_agents.store.release import MAX_KEY_BYTES, RELEASE
from edgekit.errors import InputError

PRIVATE_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
DEFAULT_EXPIRY = timedelta(days=365)
MAX_VERSION = 2**63 - 1


def new_keys(out: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``out/signing.key`` (0600) and ``out/signing.pub``. Never overwrites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    private, public = out / PRIVATE_KEY, out / PUBLIC_KEY
    for path in (private, public):
        if path.exists() or path.is_symlink():
            raise InputError(f"{path} already exists; keys are never overwritten (choose another folder)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder for the key pair")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_atomic(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), mode=0o600)
    write_atomic(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: Path) -> Any:
    """The Ed25519 private key (PEM, unencrypted) at ``path``, or :class:`InputError` saying what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if not path.is_file():
        raise InputError(f"signing key {path} does not exist; create a key pair with `edgekit keys new` "
                         "(edgekit.new_keys in Python)")
    try:
        key = load_pem_private_key(read_bounded(path, max_bytes=MAX_KEY_BYTES, what="signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path} is not an unencrypted PEM private key ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} is not an Ed25519 private key; releases are signed with Ed25519")
    return key


def sign_release(folder: str | Path, key: str | Path, *, version: int,
                 expires: timedelta = DEFAULT_EXPIRY) -> Path:
    """Sign the edgekit output ``folder`` as release ``version``: write ``folder/release.json``.

    Every artifact is hashed again first (a folder altered since edgekit wrote it is refused), then
    ``manifest.json`` and each artifact become signed targets; an existing ``release.json`` is replaced.

    >>> sign_release("fl_run/final", "keys/signing.key", version=2)     # doctest: +SKIP
    """
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, TargetFile, Targets

    folder = Path(folder)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InputError(f"release version {version!r} must be a whole number from 1 to {MAX_VERSION}")
    if not timedelta(minutes=1) <= expires <= timedelta(days=3650):
        raise InputError(f"release expiry {expires} must be between one minute and ten years")
    signer = CryptoSigner(load_private_key(Path(key)))
    try:
        manifest = read_manifest(folder)
        check_folder(folder)
        manifest_bytes = (folder / MANIFEST).read_bytes()
    except AgentError as exc:
        raise InputError(f"cannot release {folder}: {exc}") from None
    targets = {MANIFEST: TargetFile.from_data(MANIFEST, manifest_bytes, ["sha256"])}
    targets[MANIFEST].unrecognized_fields["custom"] = _summary(manifest)
    for entry in manifest["artifacts"]:
        targets[entry["file"]] = TargetFile(entry["bytes"], {"sha256": entry["sha256"]}, entry["file"])
    signed = Targets(version=version, expires=(datetime.now(timezone.utc) + expires).replace(microsecond=0),
                     targets=targets)
    metadata = Metadata(signed)
    metadata.sign(signer)
    return write_atomic(folder / RELEASE, metadata.to_bytes())


def _summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a reader of the release sees without opening the manifest: kind, formats, accuracy, recipe.
    Canonical JSON has no floats, so numbers and the recipe are written as text."""
    artifacts = manifest["artifacts"]
    accuracy = next((a.get("accuracy") for a in artifacts if isinstance(a.get("accuracy"), (int, float))), None)
    return {"kind": str(manifest.get("kind", "inference")),
            "formats": sorted({str(a.get("format")) for a in artifacts}),
            "accuracy": None if accuracy is None else f"{accuracy:.2f}",
            "recipe": json.dumps(manifest.get("recipe"), sort_keys=True, default=str),
            "created": str(manifest.get("created"))}


def public_key_id(path: str | Path) -> str:
    """The TUF key id of a public key file (what devices pin and messages name)."""
    from device_agents.store.release import load_public_key

    try:
        return str(load_public_key(path).keyid)
    except AgentError as exc:
        raise InputError(str(exc)) from None


def sign_app(folder: str | Path, key: str | Path, *, expires: timedelta = DEFAULT_EXPIRY) -> Path:
    """Sign the Flower app in ``folder`` for the fleet's devices: write ``folder/edgekit-app.json``.

    The FAB is built here with Flower's own builder (deterministic: fixed dates, sorted files), and every
    file it holds becomes a signed target (length and SHA-256). ``flwr run`` builds the same files plus
    this signature; a device (:mod:`device_agents.federated.app_guard`) installs the app only when the files match.

    >>> sign_app("fleet/app", "keys/signing.key")                     # doctest: +SKIP
    """
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, TargetFile, Targets

    from device_agents.federated.app_guard import APP_SIGNATURE

    folder = Path(folder)
    signer = CryptoSigner(load_private_key(Path(key)))
    (folder / APP_SIGNATURE).unlink(missing_ok=True)
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder))) as fab:
        files = {name: fab.read(name) for name in fab.namelist()
                 if not name.startswith(".info/") and not name.endswith("/")}
    targets = {name: TargetFile.from_data(name, data, ["sha256"]) for name, data in sorted(files.items())}
    signed = Targets(version=1, expires=(datetime.now(timezone.utc) + expires).replace(microsecond=0),
                     targets=targets)
    metadata = Metadata(signed)
    metadata.sign(signer)
    return write_atomic(folder / APP_SIGNATURE, metadata.to_bytes())
