"""The fl commands' bad input: one line, the documented exit code."""

import pytest
from conftest import run_cli

SECOND = pytest.mark.xdist_group("federated-2")  # the real processes, the CLI and the server optimizers


@SECOND
@pytest.mark.parametrize("args, fragment", [
    (["--partition", "zipf"], "is not iid or dirichlet:ALPHA"),
    (["--clients", "1"], "at least 2 clients, got 1"),
    (["--strategy", "krum"], "invalid choice: 'krum'"),
    (["--lr-schedule", "step"], "invalid choice: 'step' (choose from 'constant', 'cosine')"),
    (["--client-momentum", "0.99"], "on-device momentum must be in [0, 0.9]"),
])
def test_fl_cli_bad_input(fl_model, tmp_path, args, fragment):
    proc = run_cli("fl", "simulate", "--model", str(fl_model), "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
