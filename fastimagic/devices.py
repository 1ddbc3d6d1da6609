"""One thread per device does that device's model work.

torch keeps what cuDNN plans for a shape per thread: the execution plans of convolutions (``Conv_v8.cpp``'s
``thread_local`` benchmark cache) and the graphs of cuDNN attention (``MHA.cpp``'s ``thread_local`` graph caches,
forward and backward), which recent torch releases prefer for ``scaled_dot_product_attention`` on Hopper GPUs such
as the H200; cuBLAS handles are per thread too. The first call of a shape on a thread builds its plans, and a
cuDNN attention graph for an unusual head size (SD 1.5's 40, 80 and 160 channels) may compile a kernel: tens of
milliseconds to about a second each (as reported; docs/performance.md), dozens of them for a fine-tune's forward
and backward. The pipeline's work arrives on several threads (Prefect's task threads, which a flow run creates
afresh, and a warm-up thread), and each would build every plan again, so a warm-up on one thread would warm
nothing for the next.

:func:`run` hands a piece of work to its device's one long-lived thread and waits for it: each shape's plans are
built once per process, and a warm-up (``tasks.pipeline.prime``) builds them for the work that follows. Work on a
device is one piece at a time anyway (the model's weights are edited in place). The work runs in a copy of the
caller's context (context variables, such as an orchestrator's run context, carry over); torch's thread-local
modes (grad mode, autocast, dispatch modes, a profiler started by the caller) do not, so the work sets up its own.
A piece of work that holds a lock must not wait for another thread that waits for this device's thread: take
such locks inside the work (``tasks.pipeline`` takes the model's lock there).
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

T = TypeVar("T")

_THREADS: dict[str, _DeviceThread] = {}  # device name -> its thread
_GUARD = threading.Lock()


class _DeviceThread:
    """One device's thread: takes work from a queue, one piece at a time, for as long as the process lives. A
    daemon thread, so that it never holds the process open once its callers are gone (a caller that waits for a
    piece of work is itself what keeps the process up until that piece ends)."""

    def __init__(self, key: str):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"fastimagic-{key}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            future, context, fn, args, kwargs = self.queue.get()
            try:
                future.set_result(context.run(fn, *args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - raised in the caller
                future.set_exception(e)
            del future, context, fn, args, kwargs  # nothing of a finished piece is kept meanwhile


def name(device: str | torch.device) -> str:
    """A device's name with its index (``cuda`` is the current CUDA device's): ``cpu:0``, ``cuda:1``."""
    device = torch.device(device)
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
    return f"{device.type}:{index}"


def _thread(key: str) -> _DeviceThread:
    with _GUARD:
        if key not in _THREADS:
            _THREADS[key] = _DeviceThread(key)
        return _THREADS[key]


def thread_ident(device: str | torch.device) -> int | None:
    """The ident of ``device``'s thread (None until :func:`run` first used it)."""
    worker = _THREADS.get(name(device))
    return worker.thread.ident if worker else None


def run(device: str | torch.device, fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on ``device``'s thread, in a copy of the caller's context; its result, or its
    exception raised here. Called on that thread already (work within work): runs it in place."""
    worker = _thread(name(device))
    if worker.thread.ident == threading.get_ident():
        return fn(*args, **kwargs)
    future: Future = Future()
    worker.queue.put((future, contextvars.copy_context(), fn, args, kwargs))
    return future.result()


def _forget_after_fork() -> None:  # a forked child has the dictionary but not the threads
    global _GUARD
    _THREADS.clear()
    _GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
