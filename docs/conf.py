"""Sphinx configuration of edgekit's docs site (``make docs``; ``make test`` builds it with warnings as errors).

Sphinx, not mkdocs: the docstrings already cross-reference each other in Sphinx roles (``:func:``, ``:data:``,
``:class:``), which autodoc renders as links; pages stay Markdown through MyST. The theme is Furo.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

project = "edgekit"
author = "the edgekit developers"
copyright = "2026, the edgekit developers"  # noqa: A001 (Sphinx's name)

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated/public_api.rst"]  # included by api.md
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # BENCHMARKS.md's sections start at any level

autosummary_generate = True
autosummary_imported_members = False
# each object is documented once, where it is defined; the package faces list their exports (public_api below)
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
default_role = "code"

html_theme = "furo"
html_title = "edgekit"


def _write_public_api(app: object, config: object) -> None:
    """docs/_generated/public_api.rst: a table per package face of every name in its ``__all__``, linked to the
    name's own module, so the reference cannot drift from the curated API."""
    import importlib
    from pathlib import Path

    lines = []
    for face in ("edgekit", "device_agents"):
        module = importlib.import_module(face)
        lines += [f"``{face}``", "-" * (len(face) + 4), "", ".. autosummary::", "   :nosignatures:", ""]
        for name in module.__all__:
            value = getattr(module, name)
            home = getattr(value, "__module__", face)
            lines.append(f"   ~{home}.{name}" if home != face else f"   {face}.{name}")
        lines.append("")
    folder = Path(__file__).parent / "_generated"
    folder.mkdir(exist_ok=True)
    target = folder / "public_api.rst"
    text = "\n".join(lines)
    if not target.exists() or target.read_text() != text:  # rewritten only on change: no needless rebuilds
        target.write_text(text)


def setup(app: object) -> None:
    app.connect("config-inited", _write_public_api)
