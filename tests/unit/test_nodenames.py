"""Nodename defaulting and ``%`` expansion, with Celery's own functions as oracle.

Every property compares :mod:`celerycompat.nodenames` with
``celery.utils.nodenames`` over generated inputs: same string out, or both
raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import pytest
from billiard.process import current_process
from celery.utils import nodenames as celery_nodenames
from hypothesis import given, settings
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


@settings(max_examples=400, deadline=None)
@given(template=templates, host=hosts, name=names)
def test_host_format_matches_celery(template: str, host: str, name: Optional[str]) -> None:
    ours = outcome(lambda: nodenames.host_format(template, host, name))
    theirs = outcome(lambda: celery_nodenames.host_format(template, host, name))
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(template=templates, nodename=st.text(alphabet="abw1.@-", min_size=1, max_size=12))
def test_node_format_matches_celery(template: str, nodename: str) -> None:
    ours = outcome(lambda: nodenames.node_format(template, nodename))
    theirs = outcome(lambda: celery_nodenames.node_format(template, nodename))
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(value=node_values)
def test_default_nodename_matches_celery(value: Optional[str]) -> None:
    assert nodenames.default_nodename(value) == celery_nodenames.default_nodename(value)


@settings(max_examples=300, deadline=None)
@given(value=node_values)
def test_expand_nodename_matches_celery_worker_flag(value: Optional[str]) -> None:
    """``-n value`` as ``celery worker``'s Hostname type converts it."""
    ours = outcome(lambda: nodenames.expand_nodename(value))
    theirs = outcome(lambda: celery_nodenames.host_format(
        celery_nodenames.default_nodename(value)))
    assert ours == theirs


@pytest.mark.parametrize("index", [None, 0, 1, 6])
@pytest.mark.parametrize("template", ["%i", "%I", "w%I@%h", "/var/log/%n%I-%i.log", "%%i"])
def test_process_index_matches_celery(index: Optional[int], template: str) -> None:
    with process_index(index):
        ours = nodenames.node_format(template, "w1@example.com")
        theirs = celery_nodenames.node_format(template, "w1@example.com")
    assert ours == theirs


def test_explicit_process_index_overrides_the_process() -> None:
    assert nodenames.host_format("%i/%I", "h", process_index=3) == "3/-3"
    assert nodenames.host_format("%i/%I", "h", process_index=None) == "0/"


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
