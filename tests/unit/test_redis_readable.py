"""The native Redis path waits on sockets whose descriptors may exceed 1024.

CI found it: a long test process held more than 1024 descriptors and every
wait failed with "filedescriptor out of range in select()".
"""

from __future__ import annotations

import os
import resource
import socket

import pytest

from celerycompat.consumer.liveness import readable


def test_readable_handles_descriptors_above_1024() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 1100, "the test needs 1100 descriptors"
    if soft != resource.RLIM_INFINITY and soft <= 1100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    a, b = socket.socketpair()
    high = []
    try:
        target = 1100
        while True:
            fd = os.dup(a.fileno())
            high.append(fd)
            if fd >= target:
                break
        high_sock = socket.socket(fileno=os.dup(fd))
        try:
            assert readable([high_sock], 0.01) == []
            b.sendall(b"x")
            assert readable([high_sock], 1.0) == [high_sock]
        finally:
            high_sock.close()
    finally:
        for fd in high:
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("info, expected, warned", [
    ({"redis_version": "7.0.15"}, (7, 0), False),
    ({}, (0,), True),
    (RuntimeError("ERR unknown command 'INFO'"), (0,), True),
])
def test_an_unknown_server_version_is_said_not_silently_taken_as_old(caplog, info, expected,
                                                                       warned):
    """Unknown means BRPOP (which can lose a message popped at a crash): one WARNING."""
    from celerycompat.consumer.redis_broker import _server_version

    class Client:
        def info(self, section):
            if isinstance(info, Exception):
                raise info
            return info

    with caplog.at_level("WARNING"):
        assert _server_version(Client()) == expected
    assert any("Redis server version unknown" in r.getMessage() for r in caplog.records) is warned
