"""Both commands' console plumbing: a library error is one line and its exit code, an interrupt 130, a bug 70."""

import pytest

from device_agents.console import run
from device_agents.errors import AgentError, InputMismatchError
from device_agents.exit_codes import ExitCode


def _raise(exc):
    def handler():
        raise exc
    return handler


@pytest.mark.parametrize("exc, code, line", [
    (InputMismatchError("the input has shape (3,), expected (8, 8, 1)"), ExitCode.BAD_INPUT,
     "prog: error: the input has shape (3,), expected (8, 8, 1)"),
    (AgentError("the artifact failed its check"), ExitCode.FAILURE, "prog: error: the artifact failed its check"),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED, "prog: interrupted"),
])
def test_errors_become_one_line_and_the_documented_exit_code(capsys, exc, code, line):
    assert run("prog", _raise(exc), (AgentError,)) == int(code)
    err = capsys.readouterr().err
    assert err.splitlines() == [line]


def test_a_bug_is_exit_70_in_one_line_unless_debugging(capsys, monkeypatch):
    monkeypatch.delenv("EDGEKIT_DEBUG", raising=False)
    assert run("prog", _raise(ValueError("boom\nsecond line")), (AgentError,)) == int(ExitCode.INTERNAL_ERROR)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("prog: internal error: ValueError: boom") and "EDGEKIT_DEBUG=1" in err[0]
    monkeypatch.setenv("EDGEKIT_DEBUG", "1")
    with pytest.raises(ValueError):
        run("prog", _raise(ValueError("boom")), (AgentError,))


def test_success_passes_the_handlers_code_through():
    assert run("prog", lambda: 0, (AgentError,)) == 0
