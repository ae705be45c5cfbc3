"""sd_notify over a real AF_UNIX datagram socket (a file system path here; the units' test
uses an abstract name): the datagram's lines, the watchdog only for its process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from spine_node.sdnotify import Notifier


def test_notifications_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000",
               "WATCHDOG_PID": str(os.getpid())}
        notifier = Notifier.from_environment(env)
        assert notifier.watchdog_interval_s == 1.5
        assert notifier.ready("ready: receiver on 127.0.0.1:104")
        assert server.recv(4096) == b"READY=1\nSTATUS=ready: receiver on 127.0.0.1:104"
        assert notifier.watchdog() and server.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping() and server.recv(4096) == b"STOPPING=1"
        with pytest.raises(ValueError, match="one line"):
            notifier.status("two\nlines")
        # a manager that stops reading fills the kernel's queue: sends are dropped, never block
        sent = [notifier.watchdog() for _ in range(200)]
        assert sent[0] and not all(sent)
    # the watchdog is another process's (WATCHDOG_PID): no pings from this one
    other = Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval_s is None and not other.watchdog()
    # outside systemd nothing is sent, nothing fails
    assert not Notifier.from_environment({}).ready()
    with pytest.raises(ValueError, match="absolute path or an @abstract"):
        Notifier("relative/socket")
