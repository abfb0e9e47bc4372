"""The model store on a device: verify, smoke-test, atomic swap, rollback."""

import hashlib
import json
import shutil

import pytest

from device_agents import InstallError, ModelStore


def test_install_swaps_atomically_and_rolls_back(int8_out, float_out, tmp_path):
    store = ModelStore(tmp_path / "store")
    first = store.install(int8_out)
    assert store.current == first.resolve() and store.previous is None
    second = store.install(float_out)
    assert store.current == second.resolve() and store.previous == first.resolve()
    # a version whose artifact is broken but hash-consistent fails its smoke test: nothing changes
    broken = tmp_path / "broken"
    shutil.copytree(float_out, broken)
    (broken / "model.tflite").write_bytes(b"\x00\x00\x00\x00TFL3" + b"\x00" * 64)
    manifest = json.loads((broken / "manifest.json").read_text())
    for entry in manifest["artifacts"]:
        data = (broken / entry["file"]).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InstallError, match="failed its smoke test"):
        store.install(broken)
    assert store.current == second.resolve()
    assert not [p for p in (tmp_path / "store" / "versions").iterdir() if p.name.startswith(".")]
    # a tampered version is refused before anything is copied
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_out, tampered)
    (tampered / "model.onnx").write_bytes(b"changed")
    with pytest.raises(InstallError, match="does not match its manifest"):
        store.install(tampered)
    assert store.rollback() == first.resolve() and store.current == first.resolve()
