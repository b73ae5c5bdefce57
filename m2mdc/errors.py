"""User-facing errors.

Anything a user can cause (a bad setting, a missing file, a stage run too early) raises
:class:`M2MError`. The command line prints its message as one line on stderr and exits with
code 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class M2MError(Exception):
    """An error caused by input the user can fix; the message is one line that says how."""

    exit_code = 2
