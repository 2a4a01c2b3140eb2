"""Progress a terminal shows and a log keeps (the library's evaluation and the repository's tools).

``progress(items, desc, unit)`` yields the items. On a terminal it draws tqdm's bar where tqdm is
installed (an extra; without it, the lines below); when the output goes to a file or a pipe (a batch job, ``nohup``, the sweep's child processes), where tqdm turns itself
off, it prints one line at most every ``PROGRESS_EVERY`` seconds instead, and one at the end:

    [plain] epoch 3/15: 120/469 steps, 812 images/s, 0:02:10 elapsed, about 0:06:18 left

``quiet`` (the tools' --quiet) shows neither. ``set_postfix`` on the returned object adds figures
(loss, accuracy) to the bar and to the lines.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress", "Progress", "PROGRESS_EVERY", "clock"]

PROGRESS_EVERY = 30.0  # seconds between two lines in a log
T = TypeVar("T")


def _tqdm():
    """tqdm's class, or None where it is not installed (the library needs only torch and numpy)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def clock(seconds: float) -> str:
    """0:02:10 for 130 seconds."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Iterate over ``items``; see the module docstring."""

    def __init__(self, items: Iterable[T], desc: str, unit: str = "it", *, total: int | None = None,
                 scale: int = 1, scale_unit: str | None = None, quiet: bool = False, every: float | None = None,
                 stream=None):
        self.items, self.desc, self.unit = items, desc, unit
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.scale, self.scale_unit = scale, scale_unit  # e.g. 64 images per step: a rate in images/s
        self.quiet, self.every = quiet, PROGRESS_EVERY if every is None else every
        self.stream = stream if stream is not None else sys.stdout
        self.postfix = ""
        self._bar = None
        if not quiet and self.stream.isatty() and _tqdm() is not None:
            self._bar = _tqdm()(total=self.total, desc=desc, unit=unit, leave=False, mininterval=1.0, file=self.stream)

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _line(self, done: int, elapsed: float) -> str:
        count = f"{done}/{self.total} {self.unit}" if self.total else f"{done} {self.unit}"
        rate = ""
        if elapsed > 0 and done:
            per_second = done * self.scale / elapsed
            rate = f", {per_second:.3g} {self.scale_unit or self.unit}/s"
        left = ""
        if self.total and done and done < self.total:
            left = f", about {clock(elapsed / done * (self.total - done))} left"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {count}{rate}, {clock(elapsed)} elapsed{left}{extra}"

    def __iter__(self) -> Iterator[T]:
        start = last = time.monotonic()
        done = 0
        try:
            for item in self.items:
                yield item
                done += 1
                if self._bar is not None:
                    self._bar.update(1)
                elif not self.quiet:
                    now = time.monotonic()
                    if now - last >= self.every and (self.total is None or done < self.total):
                        print(self._line(done, now - start), file=self.stream, flush=True)
                        last = now
        finally:
            if self._bar is not None:
                self._bar.close()
            elif not self.quiet and done:
                elapsed = time.monotonic() - start
                if elapsed >= self.every:
                    print(self._line(done, elapsed), file=self.stream, flush=True)  # the last word


def progress(items: Iterable[T], desc: str, unit: str = "it", **kwargs) -> Progress:
    """``Progress(items, desc, unit, **kwargs)``: iterate over it."""
    return Progress(items, desc, unit, **kwargs)
