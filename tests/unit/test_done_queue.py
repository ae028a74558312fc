"""The consumer's done queue (consumer/done_queue.py): order, timed waits,
wake-ups from other threads, and waits that a stream of signals cannot
turn into a hang (CPython 3.11's ``SimpleQueue.get(timeout=...)`` can)."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading

import pytest

from celerycompat.consumer.done_queue import DoneQueue


def test_items_come_out_in_order_and_an_empty_wait_ends():
    done = DoneQueue()
    for n in range(3):
        done.put(n)
    assert [done.get(0.1), done.get_nowait(), done.get(0)] == [0, 1, 2]
    assert done.empty()
    with pytest.raises(queue.Empty):
        done.get(0.01)
    with pytest.raises(queue.Empty):
        done.get_nowait()


def test_a_put_from_another_thread_wakes_the_waiting_consumer():
    done = DoneQueue()
    got = []
    for n in range(200):
        threading.Timer(0.001, done.put, (n,)).start()
        got.append(done.get(30))  # a lost wake-up would wait the whole 30 s
    assert got == list(range(200))


SIGNAL_STORM = textwrap.dedent("""
    import os, queue, signal, threading, time
    from celerycompat.consumer.done_queue import DoneQueue

    done = DoneQueue()
    signals = []

    def handler(*_):
        # A handler that outlasts what is left of the wait: SimpleQueue's
        # retry then waits with a negative timeout, that is for ever (until
        # the next put, which for the consumer is the next task's end).
        signals.append(1)
        time.sleep(0.004)

    signal.signal(signal.SIGUSR1, handler)

    def storm():
        for _ in range(200):
            time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGUSR1)

    stormer = threading.Thread(target=storm, daemon=True)
    stormer.start()
    waits = 0
    # Until the storm is over: signals sent while one is pending coalesce,
    # so counting 200 handler runs could wait for ever under load.
    while stormer.is_alive():
        try:
            done.get(0.002)
        except queue.Empty:
            waits += 1
    done.put("last")
    print(waits > 0, done.get(1) == "last")
""")



def test_timed_waits_survive_a_stream_of_signals():
    """Signals land on the main thread, where the consumer waits: each wait
    must still end. Over a ``SimpleQueue`` this loop hangs on CPython 3.11
    (a handler that outlasts the timeout leaves its retry without one, and
    nothing is put)."""
    done = subprocess.run([sys.executable, "-c", SIGNAL_STORM], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], done.stderr
