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
    """Shows a run's progress on ``stream``: ``starting`` until the first report, the fine-tune (step, loss), then
    keyframes out of ``total`` with the time elapsed and an estimate of the rest.

    ``tty``: redraw one line in place (a terminal), cut to the terminal's width (``columns``, default: the width
    of ``stream``'s terminal, else ``$COLUMNS``, else 80) so that it never wraps onto a new line; :meth:`clear`
    takes it off the screen before anyone else writes (log lines, errors), and :meth:`tick` (once a second, see
    :func:`ticking`) redraws it with the clock moving. Otherwise write a line at most every ``interval`` seconds
    (:meth:`tick` too, so a long start is not silent), and one when the fine-tune ends. ``total`` may be an upper
    bound (``forget: auto`` renders its second pass only for scenes that overfit): the line then says ``up to``.
    """

    def __init__(self, total: int, stream: TextIO, *, tty: bool, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, width: int = 24, at_most: bool = False,
                 columns: Callable[[], int] | None = None):
        self.total, self.stream, self.tty, self.interval = total, stream, tty, interval
        self.clock, self.width, self.at_most = clock, width, at_most
        self.columns = columns or (lambda: _columns(stream))
        self.started = clock()
        self.done = 0
        self._render_started: float | None = None
        self._finetune: tuple[int, int, float] | None = None
        self._last_line = -1e9
        self._drawn = 0
        self._closed = False
        self._lock = threading.RLock()  # reports come from render threads, ticks from the ticker, logs from any

    def finetune(self, step: int, steps: int, loss: float) -> None:
        with self._lock:
            self._finetune = (step, steps, loss)
            self._show(force=not self.tty and step == steps)

    def keyframes(self, count: int) -> None:
        with self._lock:
            if self._render_started is None:
                self._render_started = self.clock()
            self.done += count
            self._show(force=self.done >= max(self.total, self.done))

    def tick(self) -> None:
        """Redraw with the clock moved on (a terminal), or write a line if none was written for ``interval``."""
        with self._lock:
            if not self._closed:
                self._show()

    def clear(self) -> None:
        """Take the line off the screen (a terminal), so that what is written next starts at column 0 on a clean
        line; the next report or tick draws it again."""
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write("\r" + " " * self._drawn + "\r")
                self.stream.flush()
                self._drawn = 0

    def close(self) -> None:
        """Clear the line for good: what is printed next (the summary, an error) starts on a clean line."""
        with self._lock:
            self.clear()
            self._closed = True

    def text(self) -> str:
        """The line as it reads now."""
        now = self.clock()
        elapsed = _clock_text(now - self.started)
        if self._render_started is None and self._finetune is None:
            return f"starting  {elapsed}"
        if self._render_started is None:
            step, steps, loss = self._finetune
            return f"fine-tune {step}/{steps}  loss {loss:.4f}  {elapsed}"
        total = max(self.total, self.done)
        rate_time = now - self._render_started
        left = ""
        if self.done and rate_time > 0 and self.done < total:
            left = f", ~{_clock_text(rate_time / self.done * (total - self.done))} left"
        filled = int(self.width * self.done / total) if total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        bound = "up to " if self.at_most and self.done < total else ""
        return f"keyframes {self.done}/{bound}{total} [{bar}] {elapsed} elapsed{left}"

    def _show(self, *, force: bool = False) -> None:
        if self._closed:
            return
        text = self.text()
        if self.tty:
            room = max(self.columns() - 1, 10)  # one character short of the edge: no wrap, no new line
            if len(text) > room and " [" in text:  # a narrow terminal: the numbers matter more than the bar
                text = text.split(" [")[0] + text[text.index("] ") + 1:]
            text = text[:room]
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


def _columns(stream: TextIO) -> int:
    import os

    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    if columns <= 0:  # not a terminal, or one that does not know its size (a fresh pseudo-terminal says 0)
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            columns = 80
    return columns if columns > 0 else 80


@contextlib.contextmanager
def ticking(display: ProgressDisplay, every: float = 1.0) -> Iterator[ProgressDisplay]:
    """Call ``display.tick()`` every ``every`` seconds from a daemon thread inside the ``with`` block."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            display.tick()

    thread = threading.Thread(target=run, daemon=True, name="fastimagic-progress")
    thread.start()
    try:
        yield display
    finally:
        stop.set()
        thread.join(5)
