"""Console plumbing of the ``edgekit`` and ``edgekit-agent`` commands (no heavy imports).

It lives in ``device_agents`` (the lowest layer) so that the device package stands alone and the
server CLI (``tools``) uses the same one-line errors, exit codes and native-log routing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Callable

from device_agents.errors import first_line
from device_agents.exit_codes import ExitCode, exit_code_help
from device_agents.protocol import FLOWER_ENV

NATIVE_LOG = os.path.join(tempfile.gettempdir(), "edgekit-native.log")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit with code 2.

    Top-level parsers (``exit_codes=True``) list the exit-code table in their ``--help``.
    """

    def __init__(self, *args: object, exit_codes: bool = False, **kwargs: object) -> None:
        if exit_codes:
            kwargs.setdefault("epilog", exit_code_help())
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(int(ExitCode.BAD_INPUT), f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def quiet_native_logs() -> None:
    """Send what TensorFlow, the converters and the interpreters print from C++ to a log file.

    Python's ``sys.stderr`` (progress bars, our messages) keeps the terminal. ``EDGEKIT_DEBUG=1``
    leaves everything as it is.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    if os.environ.get("EDGEKIT_DEBUG") != "1":  # Python-side chatter of TensorFlow, tf2onnx, onnxruntime's quantizer
        import logging

        for name in ("", "tensorflow", "tf2onnx", "onnxruntime", "absl", "h5py", "flwr"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if os.environ.get("EDGEKIT_DEBUG") == "1" or sys.stderr is not sys.__stderr__:
        return  # debugging, or stderr already captured (tests, notebooks)
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        log = os.open(NATIVE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 2)
        os.close(log)
        sys.stderr = os.fdopen(terminal, "w", buffering=1)
    except OSError:  # no file descriptor 2 (embedded use): leave it
        pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not raise on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _terminated(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, timeout, a service manager stopping it): unwound as Ctrl-C is


def run(prog: str, handler: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """Call ``handler``; turn the library's errors into one line on stderr and an exit code. SIGTERM stops it as
    Ctrl-C does (exit code 130): what it was writing is removed on the way out, not left for the next run."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return handler()
    except BrokenPipeError:  # the reader went away (`edgekit-agent status | head -1`): nothing left to say
        _silence_stdout()
        return int(ExitCode.SUCCESS)
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", ExitCode.FAILURE))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # a bug, not a bad input: say so, keep it to one line unless debugging
        if os.environ.get("EDGEKIT_DEBUG") == "1":
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {first_line(exc)} "
              f"(rerun with EDGEKIT_DEBUG=1 for the traceback; native log: {NATIVE_LOG})", file=sys.stderr)
        return int(ExitCode.INTERNAL_ERROR)
