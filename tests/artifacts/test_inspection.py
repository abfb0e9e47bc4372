"""Inspection of an artifact or an output folder: ops, sizes, I/O quantization, the manifest check."""

import shutil

import pytest
from conftest import assert_one_line_error, run_cli
from edgekit_cli._render import format_inspection

from edgekit.artifacts.inspection import inspect_artifact
from edgekit.errors import InputError


def test_a_folder_is_checked_and_described(int8_out):
    info = inspect_artifact(int8_out)
    assert info["manifest_ok"] is True and info["problems"] == [] and info["kind"] == "inference"
    by_file = {a["file"]: a for a in info["artifacts"]}
    assert set(by_file) == {"model.tflite", "model.onnx"}
    tflite = by_file["model.tflite"]
    assert tflite["sha256_ok"] and tflite["quantization"] == "int8" and tflite["ops"]["CONV_2D"] == 2
    assert tflite["inputs"][0]["dtype"] == "int8" and tflite["inputs"][0]["scale"] > 0
    assert tflite["gzip_bytes"] < tflite["bytes"] == (int8_out / "model.tflite").stat().st_size
    assert "QuantizeLinear" in by_file["model.onnx"]["ops"]
    text = format_inspection(info)
    assert "manifest: ok (every sha256 matches)" in text and "CONV_2D x2" in text and "scale" in text


def test_a_single_file_and_a_tampered_folder(int8_out, tmp_path):
    single = inspect_artifact(int8_out / "model.onnx")
    assert single["manifest_ok"] is None and single["artifacts"][0]["format"] == "onnx"
    copy = tmp_path / "copy"
    shutil.copytree(int8_out, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    info = inspect_artifact(copy)
    assert info["manifest_ok"] is False and [a["file"] for a in info["artifacts"]] == ["model.tflite"]
    assert "model.onnx does not match its manifest" in info["problems"][0]
    assert "FAILED" in format_inspection(info)
    with pytest.raises(InputError, match="does not exist"):
        inspect_artifact(tmp_path / "none")


def test_inspect_bad_targets(tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path / "none")), 2, "does not exist")
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    assert_one_line_error(run_cli("inspect", str(tmp_path / "junk.tflite")), 2, "neither a TFLite flatbuffer")
    assert_one_line_error(run_cli("inspect", str(tmp_path)), 2, "has no manifest.json")
    # the right magic bytes, then garbage: the parsers' errors were internal errors (exit 70)
    (tmp_path / "schema.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 200)
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07" + b"\xff" * 100)
    with pytest.raises(InputError, match=r"schema.tflite: not a valid tflite artifact \(Model provided is schema"):
        inspect_artifact(tmp_path / "schema.tflite")
    with pytest.raises(InputError, match=r"garbage.onnx: not a valid onnx artifact \(Error parsing message"):
        inspect_artifact(tmp_path / "garbage.onnx")


def test_a_trainable_folder_and_its_artifact_are_described_by_their_signatures(cnn_path, tmp_path):
    from edgekit import TrainableConfig, export_trainable

    out = tmp_path / "trainable"
    export_trainable(cnn_path, out, config=TrainableConfig(batch_size=8), progress=False)
    for target in (out, out / "trainable.tflite"):
        proc = run_cli("inspect", str(target))
        assert proc.returncode == 0, proc.stderr
        assert "signature train(" in proc.stdout and "signature set_weights(" in proc.stdout
    info = inspect_artifact(out)
    assert info["manifest_ok"] and info["kind"] == "trainable"
    assert set(info["artifacts"][0]["signatures"]) == {"train", "infer", "get_weights", "set_weights"}
    from device_agents import ArtifactError, Model

    with pytest.raises(ArtifactError, match="only signatures .*load its folder with device_agents.Trainer"):
        Model.load(out / "trainable.tflite")
