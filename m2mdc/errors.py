"""User-facing errors.

Anything a user can cause (a bad setting, a missing file, a stage run too early) raises
:class:`M2MError`. The command line prints its message as one line on stderr and exits with
code 2; every other exception is a bug and keeps its traceback. A stop by signal
(:class:`Interrupted`) is not an error: it exits with code 130 and says how to resume.
"""

from __future__ import annotations

import re
import signal

# ANSI escape sequences (CSI ... final byte, or a lone ESC) that library messages embedded in
# ours may carry, e.g. torch.load's bold "do those steps only if you trust the source".
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]?)?")


def plain_line(text: str) -> str:
    """``text`` as one line of plain text: escape sequences removed, line breaks (and the
    indentation after them) collapsed to one space."""
    return re.sub(r"\s*\n\s*", " ", _ANSI.sub("", text)).strip()


class M2MError(Exception):
    """An error caused by input the user can fix; the message is one line that says how.

    The message is normalised with :func:`plain_line`, so text quoted from a library's
    exception can never put terminal escape codes or extra lines on the error line.
    """

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        super().__init__(plain_line(str(message)))


class Interrupted(M2MError):
    """SIGINT/SIGTERM during training: the state was saved; rerunning resumes."""

    exit_code = 130


def signal_description(signum: int) -> str:
    """How a message names the signal that stopped a command.

    Example:
        >>> signal_description(signal.SIGINT), signal_description(signal.SIGTERM)
        ('interrupted (Ctrl-C)', 'stopped by SIGTERM')
    """
    if signum == signal.SIGINT:
        return "interrupted (Ctrl-C)"
    try:
        return f"stopped by {signal.Signals(signum).name}"
    except ValueError:
        return f"stopped by signal {signum}"


def error_line(exc: M2MError) -> str:
    """The line printed on stderr: ``m2mdc: error: ...``; an interruption is not an error."""
    return f"m2mdc: {exc}" if isinstance(exc, Interrupted) else f"m2mdc: error: {exc}"
