"""The native Redis path waits on sockets whose descriptors may exceed 1024.

CI found it: a long test process held more than 1024 descriptors and every
wait failed with "filedescriptor out of range in select()".
"""

from __future__ import annotations

import os
import resource
import socket

from celerycompat.consumer.redis_broker import readable


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
