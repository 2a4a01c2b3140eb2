"""An OS error in the words of the OS, for one-line messages (the C kernels' cache; the tools' files)."""

from __future__ import annotations

import os

__all__ = ["describe_os_error"]


def describe_os_error(error: OSError) -> str:
    """'no space left on device', 'permission denied', ...: the cause in the words of the OS, lower case."""
    if error.errno is not None:
        return os.strerror(error.errno).lower()
    return str(error).splitlines()[0] if str(error) else type(error).__name__
