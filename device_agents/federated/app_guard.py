"""A device runs only the Flower apps the fleet's operator signed.

Flower's SuperNode runs whatever ClientApp the SuperLink hands it: in its default (subprocess) isolation
it starts ``flwr-clientapp`` from ``PATH`` for each task, which installs the run's FAB (a zip of Python
code) and imports it. The open-source SuperLink can attach no verification to a FAB (Flower's
``--trusted-entities`` needs a licensed SuperLink), so anyone who reached the Control API could run code
on every device. ``edgekit-agent join`` therefore puts this guard first on the SuperNode's ``PATH``
under Flower's task command names (:func:`install_shims`):

- ``flwr-clientapp`` runs Flower's own ClientApp runner with one step added before the FAB is installed:
  :func:`verify_app` checks ``edgekit-app.json`` in the FAB, TUF targets metadata signed by the key the
  device trusts (the release key, ``--trust``), which lists every file of the app with its length and
  SHA-256. Any other file, a changed file, a missing or foreign signature refuses the task: the app's
  code is never written to disk or imported, and the server gets Flower's error reply.
- Flower's other task commands (``flwr-agentapp``, ``flwr-connector``, ``flwr-model``, ...) are refused
  outright: an edgekit device runs ClientApps only.

The key comes from the environment (:data:`TRUST_ENV`); without it every app is refused.

>>> verify_app(fab_bytes, load_public_key("signing.pub"))      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

from device_agents.errors import ReleaseError

APP_SIGNATURE = "edgekit-app.json"
"""The signed list of an app's files, inside the app folder and so inside its FAB."""
TRUST_ENV = "EDGEKIT_APP_TRUST"
"""The environment variable naming the public key (PEM) that must have signed every app this device runs."""
MAX_FAB_BYTES = 10 << 20  # Flower's own FAB_MAX_SIZE
MAX_APP_FILES = 256
MAX_SIGNATURE_BYTES = 1 << 20
CLIENT_COMMAND = "flwr-clientapp"


def verify_app(fab: bytes, key: Any) -> dict[str, str]:
    """Check a FAB against its signed file list; return file name -> sha256, or :class:`ReleaseError`."""
    from device_agents.store.release import verify_targets

    if len(fab) > MAX_FAB_BYTES:
        raise ReleaseError(f"the Flower app is {len(fab):,} bytes, more than the {MAX_FAB_BYTES:,} a FAB may have")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ReleaseError(f"the Flower app is not a valid FAB ({str(exc)[:80]})") from None
    with archive:
        if len(infos) > MAX_APP_FILES:
            raise ReleaseError(f"the Flower app has {len(infos)} files, more than {MAX_APP_FILES}")
        files = {info.filename: info for info in infos if not info.filename.endswith("/")}
        signature = files.get(APP_SIGNATURE)
        if signature is None:
            raise ReleaseError(f"the Flower app is not signed (no {APP_SIGNATURE}); this device runs only apps "
                               "signed by the fleet's key")
        if signature.file_size > MAX_SIGNATURE_BYTES:
            raise ReleaseError(f"{APP_SIGNATURE} of the Flower app is over {MAX_SIGNATURE_BYTES:,} bytes")
        signed = verify_targets(archive.read(signature), key, where=f"the Flower app's {APP_SIGNATURE}",
                                what="Flower app")
        listed = {name: (int(t.length), t.hashes.get("sha256")) for name, t in signed.targets.items()}
        present = {name for name in files if name != APP_SIGNATURE and not name.startswith(".info/")}
        if present != set(listed):
            differ = sorted(present ^ set(listed))[:3]
            raise ReleaseError(f"the Flower app's files are not the ones its signature lists (differ: "
                               f"{', '.join(differ)}); refusing it")
        digests = {}
        for name in sorted(present):
            length, digest = listed[name]
            if files[name].file_size != length:
                raise ReleaseError(f"{name} of the Flower app is not the file its signature lists (size)")
            data = archive.read(name)
            if len(data) != length or hashlib.sha256(data).hexdigest() != digest:
                raise ReleaseError(f"{name} of the Flower app is not the file its signature lists (sha256)")
            digests[name] = digest
    return digests


def _trusted_key() -> Any:
    from device_agents.store.release import load_public_key

    path = os.environ.get(TRUST_ENV)
    if not path:
        raise ReleaseError(f"no trusted key ({TRUST_ENV} is unset); this device runs no Flower app")
    return load_public_key(path)


def clientapp_main() -> None:
    """``flwr-clientapp`` with the app's signature checked before Flower installs or imports it."""
    import importlib

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    install = runner.install_from_fab

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            verify_app(content, _trusted_key())
        except ReleaseError as exc:  # Flower sends the reason to the server as the task's error reply
            print(f"edgekit-agent: refused a Flower app: {exc}", file=sys.stderr, flush=True)
            raise
        return install(fab_file, *args, **kwargs)

    runner.install_from_fab = checked_install
    cli.flwr_clientapp()


def refuse_main() -> None:
    """Every Flower task command but ``flwr-clientapp``: an edgekit device runs ClientApps only."""
    print(f"edgekit-agent: {Path(sys.argv[0]).name} refused: this device runs only signed ClientApps",
          file=sys.stderr)
    raise SystemExit(1)


def install_shims(folder: Path) -> Path:
    """Write the guard under every Flower task command name into ``folder``; return it (put it first on
    the SuperNode's ``PATH``)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    from device_agents.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values())):
        entry = "clientapp_main" if command == CLIENT_COMMAND else "refuse_main"
        script = (f"#!{sys.executable}\n# Written by edgekit-agent join: {command} behind the app guard.\n"
                  f"from device_agents.federated.app_guard import {entry}\n\n{entry}()\n")
        write_atomic(folder / command, script.encode(), mode=0o755)
    return folder
