"""Text the ``edgekit`` command prints: the candidate table and an inspection (the library returns data)."""

from __future__ import annotations

from typing import Any

from edgekit.artifacts.report import candidate_rows, num


def format_table(result: Any) -> str:
    """The candidate table as aligned text, for the terminal."""
    head = ["recipe", "format", "bytes", "gzip", "acc %", "drop", "agree %", "µs", "time", "budget", ""]
    lines = [head]
    for fmt, size in result.reference.items():  # what every candidate is compared with
        lines.append(["float32 (reference)", fmt, f"{size['bytes']:,}", f"{size['gzip_bytes']:,}",
                      f"{result.source['accuracy']:.2f}", "", "", f"{size.get('latency_us', 0):.0f}", "1.00x", "", ""])
    for r in candidate_rows(result):
        budget = {True: "ok", False: "over", None: "-"}[r["within_budget"]]
        if r["error"]:
            lines.append([r["recipe"], r["format"], "-", "-", "-", "-", "-", "-", "-", "failed", r["error"][:60]])
            continue
        lines.append([r["recipe"], r["format"], f"{r['bytes']:,}", f"{r['gzip_bytes']:,}",
                      num(r["accuracy"]), num(r["drop"], signed=True), f"{r['agreement']:.1f}",
                      f"{r['latency_us']:.0f}", r["speed"], budget,
                      "<- selected" if r["selected"] else ""])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)



def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_artifact`'s result."""
    lines = [f"{info['path']}"]
    if info.get("manifest_ok") is not None:
        lines.append(f"  manifest: {'ok (every sha256 matches)' if info['manifest_ok'] else 'FAILED'}"
                     f"  edgekit {info.get('edgekit_version')}  kind {info.get('kind')}")
        for problem in info.get("problems", []):
            lines.append(f"  ! {problem}")
    for art in info["artifacts"]:
        lines.append(f"  {art['file']}  {art['format']}  {art['bytes']:,} bytes  ({art['gzip_bytes']:,} gzip)")
        for key in ("quantization", "sparsity", "accuracy", "top1_agreement"):
            if art.get(key) is not None:
                lines.append(f"    {key}: {art[key]}")
        for signature, spec in art.get("signatures", {}).items():
            if len(art["signatures"]) > 1:
                lines.append(f"    signature {signature}({', '.join(spec['inputs'])}) -> {', '.join(spec['outputs'])}")
        for kind in ("inputs", "outputs"):
            for spec in art[kind]:
                quant = f"  scale {spec['scale']:.6g} zero_point {spec['zero_point']}" if spec["scale"] else ""
                lines.append(f"    {kind[:-1]} {spec['name']}: {spec['dtype']} {spec['shape']}{quant}")
        lines.append("    ops: " + ", ".join(f"{k} x{v}" for k, v in art["ops"].items()))
    return "\n".join(lines)
