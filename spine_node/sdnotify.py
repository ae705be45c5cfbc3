"""systemd service notifications (``sd_notify``): READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

The protocol, as systemd documents it (sd_notify(3), "Notes"; systemd.service(5)
``Type=notify``, ``WatchdogSec=``, ``NotifyAccess=``): the service manager passes an
``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``); the service sends newline-separated ``KEY=VALUE`` assignments in one
datagram. With ``WatchdogSec=`` set, ``$WATCHDOG_USEC`` holds the timeout in microseconds and
``$WATCHDOG_PID`` the process meant to ping (ignored by other processes); the service sends
``WATCHDOG=1`` more often than that, systemd's recommendation being every half of it.
Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager named by the environment.

    Parameters
    ----------
    socket_name : str or None
        ``$NOTIFY_SOCKET``: a file system path or an ``@``-prefixed abstract name; None or ""
        disables notifications.
    watchdog_usec : int or None
        The watchdog timeout in microseconds (None: no watchdog).

    Raises
    ------
    ValueError
        A socket name that is neither an absolute path nor an abstract ``@`` name, or a
        watchdog timeout that is not positive.
    """

    def __init__(self, socket_name: str | None, watchdog_usec: int | None = None) -> None:
        if socket_name and not socket_name.startswith(("/", "@")):
            raise ValueError(
                f"NOTIFY_SOCKET must be an absolute path or an @abstract name, got {socket_name!r}"
            )
        if watchdog_usec is not None and watchdog_usec <= 0:
            raise ValueError(f"watchdog_usec must be positive, got {watchdog_usec!r}")
        self.socket_name = socket_name or None
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: os.environ).

        The watchdog applies when ``WATCHDOG_PID`` is unset or names this process; an
        unusable value disables it with a warning instead of failing the service.
        """
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET") or None
        if name is not None and not name.startswith(("/", "@")):
            logger.warning("NOTIFY_SOCKET %r is not a unix socket; no notifications", name)
            name = None
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if raw and (not pid or pid == str(os.getpid())):
            try:
                usec = int(raw)
            except ValueError:
                usec = None
            if usec is None or usec <= 0:
                logger.warning("WATCHDOG_USEC %r is not a positive integer; no watchdog", raw)
                usec = None
        return cls(name, usec)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self.socket_name is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half the timeout), or None without a watchdog."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (keys upper-cased, e.g. ``ready="1"``).

        Returns
        -------
        bool
            True when sent; False without a socket, when the manager's queue is full (the
            send never blocks) or when sending failed (logged: a node must not stop because
            its service manager went away).
        """
        if self.socket_name is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"notification value of {key} must be one line, got {text!r}")
            lines.append(f"{key.upper()}={text}")
        address = self.socket_name
        if address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # never block: a manager that does not read (its queue of datagrams full) must
                # not stop the main loop, which also handles SIGTERM
                sock.setblocking(False)
                sock.connect(address)
                sock.send("\n".join(lines).encode("utf-8"))
        except BlockingIOError:
            logger.debug("the service manager's notification queue is full; %s dropped", lines)
            return False
        except OSError as exc:
            logger.warning("notification to the service manager failed: %s", exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell the service manager that start-up is complete (``READY=1``)."""
        return self.notify(ready="1", **({"status": status} if status else {}))

    def status(self, text: str) -> bool:
        """Free-form status line shown by ``systemctl status``."""
        return self.notify(status=text)

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``); nothing without a watchdog."""
        if self.watchdog_usec is None:
            return False
        return self.notify(watchdog="1")

    def stopping(self) -> bool:
        """Tell the service manager that the service is stopping (``STOPPING=1``)."""
        return self.notify(stopping="1")
