"""Serve the web application with uvicorn in a thread of the node process."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from spine_node.config import Settings, WebSettings

logger = logging.getLogger(__name__)


class WebStartupError(RuntimeError):
    """The web role cannot start with these settings (one line naming the key or address)."""


def is_loopback(address: str) -> bool:
    """True when ``address`` is a loopback address or ``localhost``.

    Parameters
    ----------
    address : str
        A host name or an IPv4/IPv6 address, as in ``web.bind_address``.
    """
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def https_options(web: WebSettings) -> dict[str, Any]:
    """uvicorn's TLS options for ``[web]`` (empty: plain HTTP).

    TLS with the receiver's BCP 195 cipher suites (forward-secret AEAD only, so TLS 1.2 or
    newer); with ``require_client_certificate`` a client certificate signed by ``ca_file`` is
    required for every connection.
    """
    if web.certificate is None:
        return {}
    from spine_node.tls import BCP195_CIPHERS

    return {
        "ssl_certfile": str(web.certificate),
        "ssl_keyfile": str(web.private_key),
        "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        "ssl_ciphers": BCP195_CIPHERS,
        "ssl_ca_certs": None if web.ca_file is None else str(web.ca_file),
        "ssl_cert_reqs": ssl.CERT_REQUIRED if web.require_client_certificate else ssl.CERT_NONE,
    }


def check_https(web: WebSettings) -> None:
    """Build the HTTPS context once, so that a bad file stops the start.

    Raises
    ------
    WebStartupError
        Naming the setting and file that cannot be read or used.
    """
    from spine_node.tls import unreadable_files

    problem = unreadable_files(web, "web")
    if problem is not None:
        raise WebStartupError(problem)
    if web.certificate is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(web.certificate), str(web.private_key))
        if web.ca_file is not None:
            context.load_verify_locations(str(web.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise WebStartupError(f"web HTTPS files cannot be used: {exc}") from None


@dataclass
class WebServer:
    """A running web server: its uvicorn server, thread and bound socket."""

    server: Any
    thread: threading.Thread
    sock: socket.socket

    @property
    def port(self) -> int:
        """The TCP port it listens on (the configured one, or the one chosen for port 0)."""
        return int(self.sock.getsockname()[1])

    def stop(self) -> None:
        """Finish open requests and stop serving."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_web(settings: Settings, app: Any) -> WebServer:
    """Bind ``web.bind_address:web.port`` now and serve ``app`` in a thread.

    Parameters
    ----------
    settings : Settings
        Validated settings (``[web]``).
    app : ASGI application
        From :func:`spine_node.web.create_app`.

    Returns
    -------
    WebServer
        Running; call :meth:`WebServer.stop` to end it.

    Raises
    ------
    WebStartupError
        When the address cannot be bound (naming it and the reason).
    """
    import uvicorn

    web = settings.web
    try:
        sock = _bind(web.bind_address, web.port)
    except OSError as exc:
        raise WebStartupError(
            f"web: cannot listen on {web.bind_address}:{web.port}: {exc.strerror or exc} "
            f"(is another service using port {web.port}? set web.port)"
        ) from None
    config = uvicorn.Config(
        app,
        log_config=None,  # the node's logging configuration stays in charge
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        **https_options(web),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
    )
    thread.start()
    scheme = "https" if web.certificate is not None else "http"
    logger.info("web status page on %s://%s:%d/", scheme, web.bind_address, sock.getsockname()[1])
    return WebServer(server=server, thread=thread, sock=sock)
