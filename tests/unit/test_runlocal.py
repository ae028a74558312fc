"""RunLocal: per thread, and per greenlet on one thread (the asyncio pool's runs)."""

from __future__ import annotations

import threading

import greenlet

from celerycompat.runlocal import RunLocal


def test_each_thread_sees_its_own_attributes():
    local = RunLocal("t")
    local.set("value", "main")
    seen = []

    def other():
        seen.append(local.get("value"))
        local.set("value", "other")
        seen.append(local.get("value"))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [None, "other"]
    assert local.get("value") == "main"


def test_greenlets_of_one_thread_do_not_share_them():
    local = RunLocal("g")
    order = []

    def run(name):
        local.set("value", name)
        greenlet.getcurrent().parent.switch()
        order.append((name, local.get("value")))

    first, second = greenlet.greenlet(run), greenlet.greenlet(run)
    first.switch("first")
    second.switch("second")  # sets its own value while first is suspended
    first.switch()
    second.switch()
    assert order == [("first", "first"), ("second", "second")]
    assert local.get("value") is None
