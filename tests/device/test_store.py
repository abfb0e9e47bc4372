"""The model store on a device: verify, smoke-test, atomic swap, rollback."""

import hashlib
import json
import shutil

import pytest

from device_agents.errors import InstallError
from device_agents.store.model_store import ModelStore


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
    with pytest.raises(InstallError, match="model.onnx has 7 bytes, its manifest says .*altered or truncated"):
        store.install(tampered)
    assert store.rollback() == first.resolve() and store.current == first.resolve()


def test_rollback_of_a_path_that_holds_no_store_creates_nothing(tmp_path):
    with pytest.raises(InstallError, match="no previous version to roll back to: .* holds no store"):
        ModelStore(tmp_path / "typo").rollback()
    assert not (tmp_path / "typo").exists()


def test_reinstall_repairs_a_corrupted_copy_and_rollback_refuses_one(int8_out, float_out, tmp_path):
    store = ModelStore(tmp_path / "store")
    first = store.install(int8_out)
    victim = first / "model.tflite"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")  # bit rot / tampering of the installed copy
    again = store.install(int8_out)  # the same release: the bad copy is replaced, not kept
    assert again == first and victim.read_bytes() == (int8_out / "model.tflite").read_bytes()
    store.install(float_out)
    previous = store.previous
    (previous / "model.onnx").write_bytes(b"changed")
    current = store.current
    with pytest.raises(InstallError, match=f"previous version {previous.name} fails its check"):
        store.rollback()
    assert store.current == current  # still serving


def test_stale_staging_is_removed_and_versions_are_bounded(int8_out, tmp_path):
    store = ModelStore(tmp_path / "store", keep=1)
    store.versions.mkdir(parents=True)
    stale = store.versions / ".staging.crashed"
    stale.mkdir()
    (stale / "model.tflite").write_bytes(b"\0" * 1000)  # what a SIGKILL during an install leaves
    installed = []
    for i in range(4):  # four releases of the same model (different manifests)
        release = tmp_path / f"r{i}"
        shutil.copytree(int8_out, release)
        manifest = json.loads((release / "manifest.json").read_text())
        manifest["release"] = i
        (release / "manifest.json").write_text(json.dumps(manifest))
        installed.append(store.install(release))
    assert not stale.exists()
    kept = sorted(p.name for p in store.versions.iterdir())
    assert len(set(installed)) == 4 and len(kept) == 3  # current, previous and keep=1 other
    assert store.current == installed[-1] and store.previous == installed[-2]


def test_a_size_mismatch_is_refused_before_hashing(int8_out, tmp_path):
    release = tmp_path / "r"
    shutil.copytree(int8_out, release)
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["artifacts"][0]["bytes"] = 1_500_000_000  # a manifest entry claiming 1.5 GB
    (release / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InstallError, match=r"has [\d,]+ bytes, its manifest says 1,500,000,000"):
        ModelStore(tmp_path / "store").install(release)
    manifest["artifacts"][0]["file"] = "../../etc/passwd"
    (release / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InstallError, match="outside its folder"):
        ModelStore(tmp_path / "store").install(release)


def test_a_relative_store_names_the_right_versions(int8_out, float_out, tmp_path):
    import os

    from conftest import ROOT, run_cli

    store = os.path.relpath(tmp_path / "store", ROOT)
    first = run_cli("install", "--model", str(int8_out), "--store", store, tool="edgekit-agent")
    second = run_cli("install", "--model", str(float_out), "--store", store, tool="edgekit-agent")
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    first_id = first.stdout.split()[1]
    assert f"(previous: {first_id})" in second.stdout
    assert (tmp_path / "store" / "previous").resolve().name == first_id


def test_a_killed_install_leaves_the_current_version_serving_and_its_staging_is_cleaned(int8_out, float_out,
                                                                                         tmp_path):
    from conftest import run_cli

    store = tmp_path / "store"
    assert run_cli("install", "--model", str(int8_out), "--store", str(store), tool="edgekit-agent").returncode == 0
    serving = (store / "current").resolve()
    killed = run_cli("install", "--model", str(float_out), "--store", str(store), tool="edgekit-agent",
                     env={"EDGEKIT_CRASH_AT": "install-staged"})
    assert killed.returncode == -9
    assert (store / "current").resolve() == serving and len(list((store / "versions").glob(".staging.*"))) == 1
    done = run_cli("install", "--model", str(float_out), "--store", str(store), tool="edgekit-agent")
    assert done.returncode == 0 and not list((store / "versions").glob(".staging.*"))
    assert (store / "previous").resolve() == serving
