"""RunLocal: per thread, and per greenlet on one thread (the asyncio pool's runs)."""

from __future__ import annotations

import threading

import greenlet

from celerycompat.runlocal import RunLocal


def test_each_thread_sees_its_own_attributes():
    local = RunLocal("t")
    local.value = "main"
    seen = []

    def other():
        seen.append(getattr(local, "value", None))
        local.value = "other"
        seen.append(local.value)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [None, "other"]
    assert local.value == "main"


def test_greenlets_of_one_thread_do_not_share_them():
    local = RunLocal("g")
    order = []

    def run(name):
        local.value = name
        greenlet.getcurrent().parent.switch()
        order.append((name, local.value))

    first, second = greenlet.greenlet(run), greenlet.greenlet(run)
    first.switch("first")
    second.switch("second")  # sets its own value while first is suspended
    first.switch()
    second.switch()
    assert order == [("first", "first"), ("second", "second")]
    assert getattr(local, "value", None) is None
