"""consumer/statedb.py: the ``--statedb`` file, read and written as Celery does.

The oracle is Celery's own ``celery.worker.state.Persistent``: it writes
files ccworker reads, and reads files ccworker writes. Its ``state`` is the
real ``celery.worker.state`` module, emptied around each test.
"""

from __future__ import annotations

import pickle
import shelve
import zlib

import pytest
from celery.utils.collections import LimitedSet
from celery.worker import state as celery_state
from kombu.clocks import LamportClock

from celerycompat.consumer.statedb import StateDB


@pytest.fixture
def celery_revoked():
    """Celery's module-global revoked set, empty before and after a test."""
    celery_state.revoked.clear()
    yield celery_state.revoked
    celery_state.revoked.clear()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "worker.state")


def revoked_set(*ids: str) -> LimitedSet:
    revoked = LimitedSet(maxlen=50000, expires=10800)
    for task_id in ids:
        revoked.add(task_id)
    return revoked


def test_round_trip(path):
    StateDB(path, revoked_set("a", "b", "c"), LamportClock(41)).save()
    revoked, clock = revoked_set(), LamportClock(3)
    db = StateDB(path, revoked, clock)
    assert db.load() == 3
    db.close()
    assert list(revoked) == ["a", "b", "c"]  # oldest first, as saved
    assert clock.value == 43  # past the saved 42 (forwarded at save)


def test_missing_file_is_an_empty_state(path):
    revoked, clock = revoked_set("x"), LamportClock(5)
    db = StateDB(path, revoked, clock)
    assert db.load() == 0
    db.save()
    assert list(revoked) == ["x"] and clock.value == 7  # adjust(0), then forward at save


def test_the_keys_celery_writes(path):
    StateDB(path, revoked_set("a"), LamportClock(9)).save()
    with shelve.open(path) as db:
        assert sorted(db.keys()) == ["__proto__", "clock", "zrevoked"]
        assert db["__proto__"] == 3 and db["clock"] == 10
        stored = pickle.loads(zlib.decompress(db["zrevoked"]))
    assert isinstance(stored, LimitedSet) and list(stored) == ["a"]


def test_we_read_what_celery_writes(path, celery_revoked):
    celery_revoked.update(["c1", "c2"])
    celery_db = celery_state.Persistent(celery_state, path, LamportClock(100))
    celery_db.save()
    revoked, clock = revoked_set("ours"), LamportClock(1)
    db = StateDB(path, revoked, clock)
    assert db.load() == 2
    db.close()
    assert list(revoked) == ["ours", "c1", "c2"]
    # Celery's merge wrote clock 101, its save forwarded to 102; we adjust past it.
    assert clock.value == 103


def test_celery_reads_what_we_write(path, celery_revoked):
    StateDB(path, revoked_set("w1", "w2"), LamportClock(50)).save()
    clock = LamportClock(0)
    celery_db = celery_state.Persistent(celery_state, path, clock)
    celery_db.close()
    assert list(celery_revoked) == ["w1", "w2"]
    assert clock.value == 52  # adjust(51)


def test_back_and_forth(path, celery_revoked):
    """celery -> ccworker -> celery on one file: every id revoked on the way survives."""
    celery_revoked.add("by-celery")
    celery_state.Persistent(celery_state, path, LamportClock()).save()
    celery_revoked.clear()

    revoked = revoked_set()
    ours = StateDB(path, revoked, LamportClock())
    ours.load()
    revoked.add("by-ccworker")
    ours.save()

    celery_state.Persistent(celery_state, path, LamportClock()).close()
    assert list(celery_revoked) == ["by-celery", "by-ccworker"]


def test_loaded_ids_live_from_the_restart(path):
    """Saved stamps may predate a reboot: ids are stamped with our clock, as Celery does."""
    old = LimitedSet(maxlen=10, expires=60)
    old.add("ancient", now=0.0)  # long expired by this process's monotonic clock
    with shelve.open(path) as db:  # written as-is: our own save would purge it
        db["zrevoked"] = zlib.compress(pickle.dumps(old))
    revoked = LimitedSet(maxlen=10, expires=60)
    db = StateDB(path, revoked)
    db.load()
    db.close()
    assert "ancient" in revoked


def test_expired_ids_are_not_saved(path):
    revoked = LimitedSet(maxlen=10, expires=60)
    revoked.add("stale", now=0.0)
    revoked.add("fresh")
    StateDB(path, revoked).save()
    loaded = revoked_set()
    db = StateDB(path, loaded)
    db.load()
    db.close()
    assert list(loaded) == ["fresh"]


@pytest.mark.parametrize("legacy", [
    revoked_set("l1", "l2"),  # Celery 3.0.18 - 3.1
    {"l1": 1.0, "l2": 2.0},   # before 3.0.18
], ids=["limitedset", "dict"])
def test_legacy_revoked_key_is_read_and_dropped(path, legacy):
    with shelve.open(path) as db:
        db["revoked"] = legacy
    revoked = revoked_set()
    db = StateDB(path, revoked, LamportClock())
    db.load()
    db.save()
    assert sorted(revoked) == ["l1", "l2"]
    with shelve.open(path) as stored:
        assert "revoked" not in stored and "zrevoked" in stored


def test_an_empty_zrevoked_is_no_ids(path):
    with shelve.open(path) as db:
        db["zrevoked"] = b""
        db["clock"] = 7
    revoked, clock = revoked_set(), LamportClock()
    db = StateDB(path, revoked, clock)
    assert db.load() == 0
    db.close()
    assert clock.value == 8


def test_without_a_clock_zero_is_saved(path):
    StateDB(path, revoked_set("a")).save()
    with shelve.open(path) as db:
        assert db["clock"] == 0


def test_a_corrupt_file_is_an_error(path):
    with shelve.open(path) as db:
        db["zrevoked"] = b"not zlib"
    db = StateDB(path, revoked_set())
    with pytest.raises(zlib.error):
        db.load()
    db.close()
