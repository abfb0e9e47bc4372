"""The shape of the code: packages by stage, imports only downward, one exit-code table, a curated API,
and a documented layout (docs/architecture.md) that lists every module (no TensorFlow needed: these read the source)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# edgekit's packages in the order of the path a model takes; a module may import its own rank or lower
RANKS = {"errors": 0, "_version": 0, "_tf": 0, "_progress": 0, "_io": 0, "config": 0, "loading": 1,
         "optimize": 2, "export": 3, "artifacts": 4, "compression": 5, "trainable": 6, "federated": 7,
         "fleet": 8}

# device_agents' sub-packages by role, in the same way: the wire and base files at the bottom, the commands on top
DEVICE_RANKS = {"errors": 0, "exit_codes": 0, "files": 0, "protocol": 0, "serving": 1, "training": 2, "store": 3,
                "fleet": 4, "federated": 5, "console": 6, "cli": 6, "__init__": 7}


def python_files(folder):
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts
                  and not any(part.endswith(".egg-info") or part == "build" for part in p.parts))


def imported_modules(path):
    """(module, names) of every import in a file, module names absolute."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]


def stage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_device_agents_imports_nothing_of_the_server_or_the_cli():
    for path in python_files("device_agents"):
        for module, _ in imported_modules(path):
            top = module.split(".")[0]
            assert top not in ("edgekit", "edgekit_cli", "tools", "tensorflow", "tf_keras"), (path, module)


def test_edgekit_imports_only_downward_and_never_its_package_face():
    checked = 0
    for path in python_files("edgekit"):
        rel = path.relative_to(ROOT / "edgekit")
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue  # the package face re-exports everything
        for module, names in imported_modules(path):
            if module.split(".")[0] in ("tools", "edgekit_cli"):
                pytest.fail(f"{rel} imports the CLI ({module})")
            if module == "edgekit":  # only submodules, never names of the package face
                for name in names:
                    assert (ROOT / "edgekit" / f"{name}.py").exists() or (ROOT / "edgekit" / name).is_dir(), \
                        f"{rel} imports '{name}' from the package face edgekit"
                continue
            if module.startswith("edgekit."):
                target = stage(module)
                assert RANKS[target] <= RANKS[own], f"{rel} ({own}) imports upward: {module} ({target})"
                checked += 1
    assert checked > 50


def test_library_errors_do_not_name_command_line_flags():
    flag = re.compile(r"(?<![\w-])--[a-z][\w-]*")
    for path in python_files("edgekit") + python_files("device_agents"):
        if path.name in ("cli.py", "console.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = " ".join(c.value for c in ast.walk(node.exc)
                                if isinstance(c, ast.Constant) and isinstance(c.value, str))
                assert not flag.search(text), f"{path.relative_to(ROOT)}:{node.lineno} names a flag: {text[:120]}"


def test_every_exit_code_has_help_and_every_error_uses_the_table():
    from device_agents.errors import AgentError
    from device_agents.exit_codes import EXIT_CODE_HELP, ExitCode, exit_code_help
    from edgekit import errors

    assert set(EXIT_CODE_HELP) == set(ExitCode)
    assert all(len(text) > 20 for text in EXIT_CODE_HELP.values())
    classes = [AgentError, *AgentError.__subclasses__(),
               *(c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.EdgeKitError))]
    assert len(classes) >= 12
    for cls in classes:
        assert isinstance(cls.exit_code, ExitCode), cls
    table = exit_code_help()
    for code in ExitCode:
        assert f"  {int(code):>3}  " in table
    for tool in ("edgekit", "edgekit-agent"):
        out = subprocess.run([str(Path(sys.executable).parent / tool), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "exit codes:" in out.stdout and " 70  An internal error" in out.stdout


def test_public_api_is_curated_sorted_and_importable():
    import device_agents
    import edgekit

    for package in (edgekit, device_agents):
        names = package.__all__
        assert names == sorted(names)
        assert all(hasattr(package, name) for name in names)
    assert {"Trainer", "ModelStore", "Telemetry"} <= set(device_agents.__all__)
    assert {"FederationError", "Strategy", "Partition", "compress", "export_trainable", "simulate"} <= set(
        edgekit.__all__)


def documented_layout():
    """Paths listed in the Layout block of docs/architecture.md (folders end in '/', indentation nests them)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = stack[:indent]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        elif name.endswith(".py") or name in ("pyproject.toml",):
            paths.add("/".join([*stack, name]))
    return {p for p in paths if p.split("/")[0] in ("edgekit", "device_agents", "tools")}


def test_documented_layout_lists_every_module_and_nothing_else():
    listed = documented_layout()
    actual = {str(p.relative_to(ROOT)) for folder in ("edgekit", "device_agents", "tools")
              for p in python_files(folder)} | {"device_agents/pyproject.toml"}
    assert listed - actual == set(), f"docs/architecture.md lists modules that do not exist: {sorted(listed - actual)}"
    assert actual - listed == set(), f"docs/architecture.md's Layout misses: {sorted(actual - listed)}"


def test_the_sdk_wheel_installs_its_cli_as_edgekit_cli_and_no_top_level_tools(tmp_path):
    """tools/ is the CLI's folder, but a top-level ``tools`` module in site-packages is a name other distributions
    use: the wheel maps it to ``edgekit_cli``, and lists every package folder of edgekit."""
    import zipfile

    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgekit").rglob("__init__.py")}
    assert set(listed) == folders | {"edgekit_cli"}, sorted(set(listed) ^ (folders | {"edgekit_cli"}))
    import shutil

    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("edgekit", "tools"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("edgekit_sdk-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"edgekit", "edgekit_cli"}, tops
    assert "edgekit_cli/cli.py" in names and "edgekit_cli/_render.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgekit = edgekit_cli.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_device_agents_imports_only_downward_by_role_with_no_cycle():
    """serving -> training -> store -> fleet -> federated -> commands; any import, even inside a function."""
    graph, checked = {}, 0
    for path in python_files("device_agents"):
        rel = path.relative_to(ROOT / "device_agents")
        own = rel.parts[0].removesuffix(".py")
        assert own in DEVICE_RANKS, f"{rel}: a module outside the documented roles"
        name = _module_name(path)
        graph[name] = set()
        for module, _ in imported_modules(path):
            if not module.startswith("device_agents.") or module == "device_agents.__init__":
                continue
            target = module.split(".")[1]
            assert DEVICE_RANKS[target] <= DEVICE_RANKS[own], f"{rel} ({own}) imports upward: {module}"
            graph[name].add(module)
            checked += 1
    assert checked > 40

    def visit(node, trail):
        for nxt in sorted(graph.get(node, ())):
            assert nxt not in trail, f"import cycle: {' -> '.join([*trail, nxt])}"
            visit(nxt, [*trail, nxt])

    for node in graph:
        visit(node, [node])


def test_the_wire_keys_are_spelled_only_in_the_protocol_module():
    """Config and metric keys go through device_agents.protocol on both sides (a key spelled twice drifts). Checked for
    the hyphenated keys: one-word keys (``seed``, ``momentum``) are also ordinary words of other records."""
    from device_agents.protocol import Metric, TrainConfig

    keys = {v for space in (TrainConfig, Metric) for k, v in vars(space).items() if k.isupper() and "-" in v}
    for path in python_files("edgekit") + python_files("device_agents"):
        if path.name == "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in keys:
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} spells the wire key {node.value!r}")


def test_every_module_is_imported_by_some_test():
    """A module no test imports is a module no test checks directly."""
    imported = set()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for module, names in imported_modules(path):
            imported.add(module)
            imported.update(f"{module}.{name}" for name in names)
        text = path.read_text()  # modules a test runs as code in a subprocess or a sitecustomize
        imported.update(re.findall(r"(?:from|import) ((?:edgekit|device_agents|edgekit_cli)[\w.]*)", text))
    modules = {_module_name(p) for folder in ("edgekit", "device_agents") for p in python_files(folder)}
    modules |= {_module_name(p).replace("tools", "edgekit_cli", 1) for p in python_files("tools")}
    missing = sorted(m for m in modules if m not in imported and not m.endswith("__init__")
                     and not any(i.startswith(m + ".") for i in imported))
    assert missing == [], f"no test imports: {missing}"
