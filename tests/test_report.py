"""report.md, its PNG plots and the terminal table: what a person reads after a compression."""

import struct

import pytest
from conftest import fast_training

from edgekit import CompressConfig, Recipe, compress
from tools._render import format_table


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
    assert sum("**yes**" in row for row in rows) == 1 and "**yes**" in next(r for r in rows if r.startswith("| int8"))
    assert "![Size vs accuracy of every candidate](size_vs_accuracy.png)" in report
    assert f"| float32 (source, reference) | tflite | {result.reference['tflite']['bytes']:,} |" in report
    assert "sparsity" not in report and not (out / "sparsity.png").exists()  # nothing was pruned


def test_plots_are_real_pngs(searched):
    _, out = searched
    width, height = png_size(out / "size_vs_accuracy.png")
    assert width >= 600 and height >= 400 and (out / "size_vs_accuracy.png").stat().st_size > 10_000


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
