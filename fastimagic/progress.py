"""Progress of a run, for whoever shows it: the fine-tune's steps, then keyframes written out of the total.

The pipeline reports (:func:`finetune_step`, :func:`keyframes_written`); a front end listens (:func:`listening`).
With nobody listening, reporting costs a function call. :class:`ProgressDisplay` is the ``fastimagic run``
front end: one line redrawn in a terminal, or a plain line every few seconds when the output is not a terminal
(CI, a pipe, a worker's log).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

_LISTENERS: list[Listener] = []
_LOCK = threading.Lock()


class Listener(Protocol):
    def finetune(self, step: int, steps: int, loss: float) -> None: ...

    def keyframes(self, count: int) -> None: ...


def finetune_step(step: int, steps: int, loss: float) -> None:
    """Report one fine-tune step (1-based) of at most ``steps``, with its loss."""
    with _LOCK:
        for listener in _LISTENERS:
            listener.finetune(step, steps, loss)


def keyframes_written(count: int) -> None:
    """Report ``count`` more keyframes written (or verified and kept, on resume)."""
    with _LOCK:
        for listener in _LISTENERS:
            listener.keyframes(count)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Send this process's progress reports to ``listener`` inside the ``with`` block."""
    with _LOCK:
        _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        with _LOCK:
            _LISTENERS.remove(listener)


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60:02d}:{seconds % 60:02d}"
    )


class ProgressDisplay:
    """Shows a run's progress on ``stream``: the fine-tune (step, loss), then keyframes out of ``total`` with the
    time elapsed and an estimate of the rest.

    ``tty``: redraw one line in place (a terminal); otherwise write a line at most every ``interval`` seconds, and
    one when the fine-tune ends. ``total`` may be an upper bound (``forget: auto`` renders its second pass only
    for scenes that overfit); the estimate then errs long.
    """

    def __init__(self, total: int, stream: TextIO, *, tty: bool, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, width: int = 24):
        self.total, self.stream, self.tty, self.interval = total, stream, tty, interval
        self.clock, self.width = clock, width
        self.started = clock()
        self.done = 0
        self._render_started: float | None = None
        self._last_line = -1e9
        self._drawn = 0

    def finetune(self, step: int, steps: int, loss: float) -> None:
        text = f"fine-tune {step}/{steps}  loss {loss:.4f}  {_clock_text(self.clock() - self.started)}"
        self._show(text, force=not self.tty and step == steps)

    def keyframes(self, count: int) -> None:
        now = self.clock()
        if self._render_started is None:
            self._render_started = now
        self.done += count
        total = max(self.total, self.done)
        elapsed = now - self.started
        rate_time = now - self._render_started
        left = ""
        if self.done and rate_time > 0 and self.done < total:
            left = f", ~{_clock_text(rate_time / self.done * (total - self.done))} left"
        filled = int(self.width * self.done / total) if total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"keyframes {self.done}/{total} [{bar}] {_clock_text(elapsed)} elapsed{left}"
        self._show(text, force=self.done >= total)

    def close(self) -> None:
        """End the display's line (a terminal) so that what is printed next starts on its own line."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0

    def _show(self, text: str, *, force: bool = False) -> None:
        if self.tty:
            pad = " " * max(0, self._drawn - len(text))
            self.stream.write(f"\r{text}{pad}")
            self._drawn = len(text)
        else:
            now = self.clock()
            if not force and now - self._last_line < self.interval:
                return
            self._last_line = now
            self.stream.write(f"progress: {text}\n")
        self.stream.flush()
