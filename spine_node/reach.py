"""Can the node reach a destination that has no DICOM C-ECHO (HL7 over MLLP, webhooks)?

``spine-node echo NAME`` C-ECHOes a DICOM destination. HL7 v2 has no echo message and a
webhook receiver may answer only POST, so for those the check is what the node can prove
without sending a result: the TCP connection is accepted (and, for an ``https`` webhook, the
TLS handshake with certificate and host name verification succeeds).
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

__all__ = ["check_connect", "url_endpoint"]


def url_endpoint(url: str) -> tuple[str, int, bool]:
    """Host, port and whether TLS is used, for an ``http``/``https`` URL.

    Raises
    ------
    ValueError
        If the URL is not http(s) or has no host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    tls = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if tls else 80), tls


def check_connect(host: str, port: int, timeout_s: float, tls: bool = False) -> str | None:
    """Open (and close) a TCP connection, with a verified TLS handshake when ``tls``.

    Parameters
    ----------
    host : str
        Host name or address.
    port : int
        TCP port.
    timeout_s : float
        Connect (and handshake) timeout, seconds.
    tls : bool
        Verify the server's certificate and host name against the system's trust store.

    Returns
    -------
    str or None
        None when connected; otherwise why not (refused, timed out, TLS error).
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if tls:
                context = ssl.create_default_context()
                with context.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
