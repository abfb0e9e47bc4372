"""The one exit-code table of the ``edgekit`` and ``edgekit-agent`` commands, with help for each code.

Like Flower's ``flwr.common.exit.exit_code``: every code a command can return is listed here, and
:data:`EXIT_CODE_HELP` says what it means and what to do (a test checks every code has help).
It lives in ``device_agents``, the lowest layer, so both commands read the same table.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``edgekit`` and ``edgekit-agent``."""

    SUCCESS = 0
    FAILURE = 1          # the work could not be done: conversion, verification, federation, integrity
    BAD_INPUT = 2        # a bad argument, file or option value: nothing was changed
    BUDGET_NOT_MET = 3   # edgekit compress: no candidate within the accuracy budget (report kept)
    ROLLOUT_STOPPED = 4  # edgekit fleet rollout: the canary failed its gates (rolled back) or devices refused
    INTERNAL_ERROR = 70  # a bug: not caused by the input (EX_SOFTWARE)
    INTERRUPTED = 130    # Ctrl-C (128 + SIGINT), or SIGTERM


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "Done: every output was written (atomically) and verified.",
    ExitCode.FAILURE: "The work failed although the input was accepted (a converter or runtime failed, an "
                      "artifact failed verification or its integrity check, a federated run failed). The "
                      "message names the step and the numbers; nothing half-written was left.",
    ExitCode.BAD_INPUT: "A bad argument, file or option value (missing or corrupt model, data that does not fit "
                        "the model, unknown option value, unwritable output). Fix what the message names and "
                        "run again; nothing was changed.",
    ExitCode.BUDGET_NOT_MET: "edgekit compress: no candidate kept the accuracy drop within the budget. The "
                             "report (report.md) was written; no artifact was. Allow a larger drop or try "
                             "other recipes.",
    ExitCode.ROLLOUT_STOPPED: "edgekit fleet rollout: the canary devices failed a gate (they were rolled back "
                              "and serve the previous version), or devices after the canary did not install the "
                              "release. The message names the gate and the numbers; the job folder has "
                              "rollout.json.",
    ExitCode.INTERNAL_ERROR: "An internal error (a bug, not your input). Rerun with EDGEKIT_DEBUG=1 for the "
                             "traceback and report it.",
    ExitCode.INTERRUPTED: "Interrupted (Ctrl-C, or SIGTERM). Outputs are written atomically, so nothing "
                          "half-written was left.",
}
"""Exit code -> what it means and what to do."""


def exit_code_help() -> str:
    """The table as text, for ``--help`` epilogs."""
    return "exit codes:\n" + "\n".join(f"  {int(code):>3}  {EXIT_CODE_HELP[code].split('. ')[0].rstrip('.')}"
                                       for code in ExitCode)
