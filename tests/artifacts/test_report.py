"""report.md, its PNG plots and the terminal table: what a person reads after a compression."""

import struct

import numpy as np
import pytest
from conftest import fast_training
from edgekit_cli._render import format_table

from edgekit import CompressConfig, Recipe, compress


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def searched(cnn_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    recipes = (Recipe(quantize="float16"), Recipe(quantize="int8"))
    result = compress(cnn_path, "digits", out, progress=False,
                      config=CompressConfig(max_accuracy_drop=5.0, search=recipes, formats=("tflite",),
                                            training=fast_training()))
    return result, out


def test_report_has_a_row_per_candidate_and_marks_the_selected(searched):
    result, out = searched
    report = (out / "report.md").read_text()
    assert report.startswith("# edgekit compression report")
    assert f"accuracy {result.source['accuracy']:.2f}%" in report
    assert "- accuracy budget: at most 5 points below the source; smallest by gzip_bytes" in report
    assert f"- **selected: {result.selected.recipe.name}**" in report
    candidates = report.split("## Candidates")[1].split("\n## ")[0]  # a remedies table may list int8 again
    rows = [line for line in candidates.splitlines() if line.startswith(("| float16 |", "| int8 |"))]
    assert len(rows) == 2 and all("| ok |" in row for row in rows)
    # each accuracy with its 95% Wilson interval on the evaluation count, each drop with its paired margin
    from edgekit.artifacts.uncertainty import wilson_interval

    evaluated = result.data_info["evaluation"]
    assert f"- evaluation: {evaluated} samples; the source's accuracy {result.source['accuracy']:.2f}%" in report
    for row, cand in zip(rows, result.candidates):
        art = cand.artifacts[0]
        low, high = wilson_interval(art.accuracy, evaluated)
        assert f"| {art.accuracy:.2f} ({low:.1f}-{high:.1f}) | {art.accuracy_drop:+.2f} ±" in row, row
    assert sum("**yes**" in row for row in rows) == 1 and "**yes**" in next(r for r in rows if r.startswith("| int8"))
    assert "![Size vs accuracy of every candidate](size_vs_accuracy.png)" in report
    assert f"| float32 (source, reference) | tflite | {result.reference['tflite']['bytes']:,} |" in report
    assert "sparsity" not in report and not (out / "sparsity.png").exists()  # nothing was pruned


def _pixels_near(image, rgb, tolerance):
    return int((np.abs(image[..., :3] - np.array(rgb)) < tolerance).all(axis=-1).sum())


def _pixels_of_hue(image, channel):
    """Pixels where one channel stands out over the other two by more than half the range."""
    others = np.delete(image[..., :3], channel, axis=-1).max(axis=-1)
    return int((image[..., channel] - others > 0.4).sum())


def test_plots_are_real_pngs(searched):
    """The picture holds what its legend says: a marker per candidate, the budget line and the selected candidate
    circled."""
    from matplotlib.image import imread

    _, out = searched
    width, height = png_size(out / "size_vs_accuracy.png")
    assert width >= 600 and height >= 400
    image = imread(out / "size_vs_accuracy.png")
    assert image.shape[:2] == (height, width)
    assert _pixels_of_hue(image, 0) > 100  # the budget line (red, dotted)
    assert _pixels_of_hue(image, 1) > 100  # the selected candidate's circle (green)
    marker = np.array([0x1F, 0x77, 0xB4]) / 255 * 0.8 + 0.2  # tflite's markers: C0 at alpha 0.8 over white
    assert _pixels_near(image, marker, 0.03) > 80  # two candidates' filled markers


def test_terminal_table(searched):
    result, _ = searched
    lines = format_table(result).splitlines()
    assert lines[0].split() == ["recipe", "format", "bytes", "gzip", "acc", "%", "drop", "agree", "%", "µs", "time",
                                "budget"]
    selected = [line for line in lines if line.endswith("<- selected")]
    assert len(selected) == 1 and selected[0].startswith("int8") and len(lines) == 4
    assert f"{result.selected.artifacts[0].bytes:,}" in selected[0]
    reference = next(line for line in lines if line.startswith("float32 (reference)"))
    assert f"{result.reference['tflite']['bytes']:,}" in reference
    assert result.reference["tflite"]["bytes"] > 3 * result.selected.artifacts[0].bytes  # int8 vs float32
