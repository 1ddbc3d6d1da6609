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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_EXECUTORS: dict[str, ThreadPoolExecutor] = {}
_THREADS: dict[str, int] = {}  # device name -> the ident of its thread
_GUARD = threading.Lock()


def name(device: str | torch.device) -> str:
    """A device's name with its index (``cuda`` is the current CUDA device's): ``cpu:0``, ``cuda:1``."""
    device = torch.device(device)
    index = device.index
    if index is None:
        index = torch.cuda.current_device() if device.type == "cuda" else 0
    return f"{device.type}:{index}"


def _executor(key: str) -> ThreadPoolExecutor:
    with _GUARD:
        executor = _EXECUTORS.get(key)
        if executor is None:

            def started() -> None:
                _THREADS[key] = threading.get_ident()

            # One worker: it lives as long as the process (an idle pool keeps its thread) and is joined at exit.
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"fastimagic-{key}", initializer=started)
            _EXECUTORS[key] = executor
        return executor


def thread_ident(device: str | torch.device) -> int | None:
    """The ident of ``device``'s thread (None until :func:`run` first used it)."""
    return _THREADS.get(name(device))


def run(device: str | torch.device, fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on ``device``'s thread, in a copy of the caller's context; its result, or its
    exception raised here. Called on that thread already (work within work): runs it in place."""
    key = name(device)
    executor = _executor(key)
    if _THREADS.get(key) == threading.get_ident():
        return fn(*args, **kwargs)
    context = contextvars.copy_context()
    return executor.submit(context.run, fn, *args, **kwargs).result()


def _forget_after_fork() -> None:  # a forked child has the dictionaries but not the threads
    global _GUARD
    _EXECUTORS.clear()
    _THREADS.clear()
    _GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
