"""What the agent refuses before it reads or runs: tampered artifacts, zip bombs, huge non-model files, wrong first
bytes."""

import json
import shutil

import numpy as np
import pytest
from conftest import BIN, assert_one_line_error, peak_rss_mib, run_cli

from device_agents import ArtifactError, IntegrityError, Model
from device_agents.serving.integrity import verified_artifact


def test_integrity_refuses_a_tampered_artifact(int8_out, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_out, copy)
    assert verified_artifact(copy).format == "tflite"
    data = bytearray((copy / "model.tflite").read_bytes())
    data[100] ^= 0x01
    (copy / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its manifest: sha256"):
        verified_artifact(copy)


def test_the_agent_refuses_a_zip_bomb_and_a_huge_non_model_file_without_reading_them(int8_out, tmp_path):
    import zipfile

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (2**26, 8, 8, 1)})
        member.write(b"\0" * 2**24)  # 16 MiB of a declared 16 GiB: the header is what is checked
    proc = run_cli("predict", "--model", str(int8_out), "--input", str(bomb), "--output", str(tmp_path / "y.npy"),
                   tool="edgekit-agent")
    assert proc.returncode == 2 and "declares shape (67108864, 8, 8, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "y.npy").exists()
    huge = tmp_path / "huge.tflite"
    with open(huge, "wb") as handle:  # 3 GiB, sparse: it costs nothing unless someone reads it
        handle.truncate(3 * 2**30)
    with pytest.raises(ArtifactError, match="neither a TFLite flatbuffer nor an ONNX model"):
        Model.load(huge)
    with open(huge, "r+b") as handle:
        handle.write(b"\0\0\0\0TFL3")
    with pytest.raises(ArtifactError, match="more than the 2,147,483,648 a model artifact may have"):
        Model.load(huge)




def test_install_checks_an_artifacts_first_bytes_before_copying_or_hashing_it(float_out, tmp_path):
    """The issue's case: an unpinned store and a 2 GB sparse file listed as model.tflite."""
    folder = tmp_path / "release"
    folder.mkdir()
    manifest = json.loads((float_out / "manifest.json").read_text())
    manifest["artifacts"] = [{**manifest["artifacts"][0], "file": "model.tflite", "bytes": 2_000_000_000}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with open(folder / "model.tflite", "wb") as handle:
        handle.truncate(2_000_000_000)
    proc, peak = peak_rss_mib([str(BIN / "edgekit-agent"), "install", "--model", str(folder), "--store",
                                str(tmp_path / "store")])
    assert_one_line_error(proc, 1, "neither a TFLite flatbuffer nor an ONNX model", "before its 2,000,000,000 bytes")
    assert peak < 200, peak
    assert not (tmp_path / "store" / "versions").exists() or not any((tmp_path / "store" / "versions").iterdir())
    # an ONNX file listed as tflite is refused too, from its first bytes
    shutil.copy(float_out / "model.onnx", folder / "model.tflite")
    manifest["artifacts"][0]["bytes"] = (folder / "model.tflite").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("install", "--model", str(folder), "--store", str(tmp_path / "store"),
                                  tool="edgekit-agent"), 1, "is a onnx file, its manifest says tflite")
