"""The one place where the project writes its files: atomic writes with one-line errors.

Every output of train.run, train.eval and the benchmarks (checkpoints, model.pt,
metrics.jsonl, reports, plots, eval.json, results.json) goes through ``write_with``
(or its shorthands): the bytes go to a temporary file beside the target
(``<name>.<random>.tmp``), are flushed and synced to disk, and the temporary file is
renamed over the target. So a full disk, an unwritable folder or a process killed
mid-write leaves the previous complete file untouched; on an OS error the temporary
file is removed and ``WriteError`` says in one line which file and why ("no space left
on device", "permission denied", "read-only file system"). A plot is not worth
stopping for: ``save_figure`` (and ``optional_plot`` around the drawing) print a
warning line instead.

It lives in the repository's ``plumbing`` (shared by train/ and bench/, which must not import
each other), not in the installed library: writing the tools' files is not the library's business.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mpd_triton.oserrors import describe_os_error

__all__ = ["WriteError", "TMP_SUFFIX", "describe_os_error", "write_with", "write_bytes", "write_text", "write_json",
           "save_figure", "optional_plot", "ensure_writable", "free_bytes", "remove_leftovers", "format_bytes"]

TMP_SUFFIX = ".tmp"



class WriteError(RuntimeError):
    """A file that could not be written: ``str()`` is one line naming the file and the cause.

    ``path`` is the file (or folder), ``cause`` the reason, ``errno`` the OS error number (ENOSPC too
    when ensure_writable finds too little free space; None for a cause that is no OS error).
    """

    def __init__(self, path: Path | str, cause: str, errno_: int | None = None, hint: str = ""):
        self.path, self.cause, self.errno, self.hint = Path(path), cause, errno_, hint
        super().__init__(f"cannot write {self.path}: {cause}" + (f"; {hint}" if hint else ""))

    @classmethod
    def from_os_error(cls, path: Path | str, error: OSError) -> "WriteError":
        return cls(path, describe_os_error(error), error.errno)

    def with_hint(self, hint: str) -> "WriteError":
        """The same error with what to do about it appended."""
        return WriteError(self.path, self.cause, self.errno, hint)


class _RecordingFile:
    """A file object that remembers the exception of a failed write (an OSError, or Ctrl-C / SIGTERM
    arriving then): torch's serializer turns any of them into "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos", losing the cause."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path`` (the permissions of a plain open(), unlike mkstemp's 0600)."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp


def write_with(path: Path | str, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object (``torch.save(obj, f)``,
    ``f.write(data)``, ``fig.savefig(f, format=...)``), which then replaces ``path``.

    Raises WriteError on an OS error (the temporary file removed, a previous ``path`` untouched);
    any other exception of ``write`` propagates as it is, the temporary file removed too.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError.from_os_error(path.parent, e) from None
    recorder, tmp = None, None
    try:
        fd, tmp = _create_temporary(path)
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingFile(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError.from_os_error(path, e) from None
    except Exception as e:
        cause = recorder.error if recorder is not None else None
        if isinstance(cause, OSError):
            raise WriteError.from_os_error(path, cause) from None
        if cause is not None and cause is not e:
            raise cause.with_traceback(None) from None  # e.g. KeyboardInterrupt, lost inside torch.save
        raise
    finally:
        if tmp is not None and tmp.exists():  # anything but success: an error, Ctrl-C, SIGTERM made an exception
            _remove(tmp)
    _sync_folder(path.parent)
    return path


def write_bytes(path: Path | str, data: bytes) -> Path:
    return write_with(path, lambda f: f.write(data))


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, payload: Any, **dumps_options) -> Path:
    """``json.dumps(payload, indent=2, **dumps_options)`` and a final newline."""
    return write_text(path, json.dumps(payload, **{"indent": 2, **dumps_options}) + "\n")


def save_figure(fig, path: Path | str, **savefig_options) -> bool:
    """``fig.savefig`` through ``write_with``; a plot that cannot be drawn or written prints one warning line
    to stderr and returns False instead of stopping the run (the figure is not closed here)."""
    path = Path(path)
    try:
        write_with(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or None, **savefig_options))
        return True
    except Exception as e:  # a plot is not worth stopping for
        reason = str(e) if isinstance(e, WriteError) else f"cannot draw {path}: {type(e).__name__}: " + (
            str(e).splitlines()[0] if str(e) else "")
        print(f"warning: {reason} (plot skipped)", file=sys.stderr, flush=True)
        return False


def optional_plot(fallback: Callable[[], Any] = lambda: None):
    """Decorator for a function that draws and saves plots (with ``save_figure``): any exception while
    drawing prints one warning line and returns ``fallback()`` instead of stopping the run; the figures
    the call opened are closed."""

    def decorate(draw):
        @functools.wraps(draw)
        def wrapper(*args, **kwargs):
            pyplot = sys.modules.get("matplotlib.pyplot")
            before = set(pyplot.get_fignums()) if pyplot else set()
            try:
                return draw(*args, **kwargs)
            except Exception as e:
                detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(f"warning: {draw.__name__} could not draw its plot ({type(e).__name__}: {detail}); plot skipped",
                      file=sys.stderr, flush=True)
                pyplot = sys.modules.get("matplotlib.pyplot")
                for number in set(pyplot.get_fignums()) - before if pyplot else ():
                    pyplot.close(number)
                return fallback()

        return wrapper

    return decorate


def free_bytes(folder: Path | str) -> int:
    """Bytes free for an unprivileged user in the file system of ``folder``."""
    return shutil.disk_usage(folder).free


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def ensure_writable(folder: Path | str, need_bytes: int = 0, what: str = "the output") -> Path:
    """Create ``folder``, check that a file can be written there, and that ``need_bytes`` are free.

    Raises WriteError naming the folder and the cause; run it before the work starts.
    """
    folder = Path(folder)
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # what a refusal removes again
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError.from_os_error(folder, e) from None
        if not folder.is_dir():
            raise WriteError(folder, "not a folder", errno.ENOTDIR)
        try:
            write_bytes(folder / ".write-test", b"mpd-triton write test\n")
        except WriteError as e:
            raise WriteError(folder, e.cause, e.errno) from None
        _remove(folder / ".write-test")
        if need_bytes > 0:
            free = free_bytes(folder)
            if free < need_bytes:
                raise WriteError(folder, f"{what} needs about {format_bytes(need_bytes)} but only "
                                         f"{format_bytes(free)} are free there", errno.ENOSPC)
    except WriteError:
        for path in created:  # leaf first; only folders this call made, and only while empty
            try:
                path.rmdir()
            except OSError:
                break
        raise
    return folder


def remove_leftovers(folder: Path | str, recursive: bool = False) -> list[Path]:
    """Remove the temporary files (``*.tmp``) of writes that a killed process left in ``folder``
    (and its sub-folders when ``recursive``); returns what was removed. Only when no other
    process is writing there: a resumed run calls it before it starts."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(f"*{TMP_SUFFIX}") if recursive else folder.glob(f"*{TMP_SUFFIX}")):
        if path.is_file():
            _remove(path)
            if not path.exists():
                removed.append(path)
    return removed
