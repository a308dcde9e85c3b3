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
