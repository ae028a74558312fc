"""Nodename defaulting and ``%`` expansion (Celery's own functions; these
pin the strings ``-n``, ``--logfile``, ``--pidfile`` and ``--statedb`` get)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import pytest
from billiard.process import current_process
from hypothesis import strategies as st

from celerycompat import nodenames

# Characters that exercise the tokenizer: known and unknown keys, ``%%``,
# non-word characters after ``%``, Unicode word characters, separators.
TEMPLATE_ALPHABET = "%%%hndiIpxyz_9é.-@/ "
templates = st.text(alphabet=TEMPLATE_ALPHABET, max_size=12)
hosts = st.text(alphabet="abc.-1", min_size=1, max_size=10)
names = st.one_of(st.none(), st.text(alphabet="abw1-_", min_size=1, max_size=5))
node_values = st.one_of(st.none(), st.text(alphabet="abw1.%hnd@-", max_size=12))


def outcome(fn: Callable[[], Optional[str]]) -> tuple[str, Optional[str]]:
    """``("ok", result)`` or ``("error", None)`` so both sides compare."""
    try:
        return "ok", fn()
    except ValueError:
        return "error", None


@contextlib.contextmanager
def process_index(index: Optional[int]) -> Iterator[None]:
    """Pretend to be prefork child ``index`` (0-based, as billiard stores it)."""
    process = current_process()
    had = hasattr(process, "index")
    old = getattr(process, "index", None)
    if index is None:
        if had:
            del process.index
    else:
        process.index = index
    try:
        yield
    finally:
        if had:
            process.index = old
        elif hasattr(process, "index"):
            del process.index


@pytest.mark.parametrize("index", [None, 0, 1, 6])
@pytest.mark.parametrize("template, expected", [
    ("%i", "{i}"), ("%I", "{I}"), ("w%I@%h", "w{I}@example.com"),
    ("/var/log/%n%I-%i.log", "/var/log/w1{I}-{i}.log"), ("%%i", "%i"),
])
def test_process_index(index: Optional[int], template: str, expected: str) -> None:
    """``%i``: the 1-based prefork child index, 0 in the main process;
    ``%I``: the same with a dash, empty in the main process."""
    with process_index(index):
        got = nodenames.node_format(template, "w1@example.com")
    plain = str(index + 1) if index is not None else "0"
    dashed = f"-{index + 1}" if index is not None else ""
    assert got == expected.format(i=plain, I=dashed)


@pytest.mark.parametrize(("value", "expected"), [
    (None, "celery@{host}"),
    ("", "celery@{host}"),
    ("w1", "celery@w1"),
    ("w1@", "w1@{host}"),
    ("@h.example.com", "celery@h.example.com"),
    ("w1@%h", "w1@{host}"),
    ("w1@a@b", "w1@a@b"),
])
def test_default_nodename_examples(value: Optional[str], expected: str) -> None:
    host = nodenames.local_hostname()
    assert nodenames.expand_nodename(value) == expected.format(host=host)


def test_node_format_keys() -> None:
    fmt = nodenames.node_format
    assert fmt("%n|%h|%d|%p|%%", "w1@box.example.com") == \
        "w1|box.example.com|example.com|w1@box.example.com|%"
    assert fmt(None, "w1@box") is None
    assert fmt("", "w1@box") == ""
    assert fmt("%n.pid", "box.example.com") == "celery.pid"


def test_unknown_key_is_an_error_and_non_word_is_kept() -> None:
    with pytest.raises(ValueError, match="Unknown format %x"):
        nodenames.host_format("w1@%x", "h")
    assert nodenames.host_format("100%-%", "h") == "100%-%"
