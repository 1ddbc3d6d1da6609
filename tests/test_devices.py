"""fastimagic.devices: a device's work runs on that device's one thread."""

from __future__ import annotations

import contextvars
import threading

import pytest

from fastimagic import devices

WHO = contextvars.ContextVar("who", default="nobody")


def test_work_runs_on_one_long_lived_thread_per_device_and_returns_its_result():
    here = threading.get_ident()
    first = devices.run("cpu", threading.get_ident)
    assert first != here and devices.thread_ident("cpu") == first == devices.thread_ident("cpu:0")
    assert devices.run("cpu:0", lambda a, b=0: (threading.get_ident(), a + b), 2, b=3) == (first, 5)
    assert devices.run("cpu:1", threading.get_ident) not in (first, here)  # another device: its own thread
    assert devices.name("cpu") == "cpu:0"
    # it never holds the process open: a run stopped by a signal exits once the work it waits for has ended
    assert [t.daemon for t in threading.enumerate() if t.ident == first] == [True]


def test_work_sees_the_callers_context_and_raises_its_error_in_the_caller():
    token = WHO.set("task run 7")
    try:
        assert devices.run("cpu", WHO.get) == "task run 7"
    finally:
        WHO.reset(token)
    def fails():
        raise ValueError("bad size")

    with pytest.raises(ValueError, match="bad size"):
        devices.run("cpu", fails)
    assert devices.run("cpu", lambda: 1) == 1  # the thread outlives an error


def test_work_within_work_runs_in_place():
    """A piece of work that calls for more work on its own device does not wait for itself."""

    def outer():
        return threading.get_ident(), devices.run("cpu", threading.get_ident)

    outer_thread, inner_thread = devices.run("cpu", outer)
    assert outer_thread == inner_thread == devices.thread_ident("cpu")


def test_work_from_many_threads_runs_one_piece_at_a_time():
    running, most, lock = [0], [0], threading.Lock()

    def work():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.02)
        with lock:
            running[0] -= 1

    callers = [threading.Thread(target=devices.run, args=("cpu", work)) for _ in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(30)
    assert most[0] == 1
