"""One process at a time in an output folder: an advisory lock (flock) on a file in it.

    with folder_lock(out, "train.run"):
        ...   # a second train.run on the same folder is refused with FolderBusy, naming this one

The lock file keeps the holder's description (the tool, its pid, host and start time) for the
message of the process refused. A folder the lock had to create is removed again if nothing but the
lock file was written in it (a run refused before it began leaves nothing behind). The OS releases the lock when the holder exits, however it exits
(a crash or SIGKILL included): a stale lock file from a dead process blocks nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from pathlib import Path
from typing import Iterator

__all__ = ["FolderBusy", "folder_lock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock (one-line message naming it)."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, tool: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold ``folder/name`` (created with the folder if missing) for the duration of the block; raise
    FolderBusy at once if another process holds it, and OSError if the folder cannot be written."""
    import fcntl  # POSIX; the tools run on Linux and macOS

    folder = Path(folder)
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # what to take away if left empty
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    try:
        handle = open(path, "a+")
    except OSError:
        _remove_empty(created)
        raise
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusy(f"{folder} is in use by {holder}: wait for it to finish, or choose another "
                             "output folder") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(f"{tool} (pid {os.getpid()} on {socket.gethostname()}, started {started})\n")
        handle.flush()
        yield path
    finally:
        if created and [p.name for p in folder.iterdir()] == [name]:  # refused before it wrote anything
            path.unlink(missing_ok=True)
            _remove_empty(created)
        handle.close()  # releases the lock


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this lock created (innermost first), as far as they are empty."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            return
