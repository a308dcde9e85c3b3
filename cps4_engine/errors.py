"""The one exception type users see.

Every problem caused by user input (a missing file, a wrong run folder, a bad option) is
raised as :class:`CPS4Error` with a one-line message that names the file or option and
the problem. The command line prints it without a traceback; the widgets show it as a
napari notification.
"""

from __future__ import annotations

from pathlib import Path


class CPS4Error(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        text = f"{path}: {message}" if path is not None else message
        super().__init__(" ".join(text.split()))


def os_error_message(error: OSError) -> str:
    """One line for an operating-system error, naming the path(s): ``/out: Read-only file system``.

    Used by the command line and the docks alike (a read-only ``--out``, an unreadable file,
    a folder under a file, a full disk ...).
    """
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    return f"{where + ': ' if where else ''}{reason}"
