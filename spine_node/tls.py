"""DICOM TLS contexts (PS3.15 Annex B, BCP 195 secure transport profile).

Both sides use TLS 1.2 or newer with forward-secret AEAD cipher suites only (ECDHE/DHE with
AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites are all AEAD). The receiver trusts client
certificates only from the configured ``ca_file`` (never the system store), so "client
certificate required" means "signed by our CA", not "signed by any public CA".
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from spine_node.config import TLSSettings

#: TLS 1.2 cipher suites of the BCP 195 profile (RFC 9325): forward secrecy, AEAD only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!SHA1"


def _check_file(value: Path | None, key: str) -> Path:
    if value is None:
        raise ValueError(f"tls.{key} is required here, got None")
    if not Path(value).is_file():
        raise ValueError(f"tls.{key} = {str(value)!r} is not a readable file")
    return Path(value)


def unreadable_files(settings: object, prefix: str) -> str | None:
    """Say which of ``settings``' certificate, private_key and ca_file cannot be read.

    Used at start-up (receiver, dispatcher, web page), so that a missing or unreadable file
    stops the start with the setting's name rather than failing on the first connection.

    Parameters
    ----------
    settings : object
        Anything with ``certificate``, ``private_key`` and ``ca_file`` attributes (paths or
        None): :class:`~spine_node.config.TLSSettings`, the web settings.
    prefix : str
        The settings' name in the configuration (``"tls"``, ``"web"``, ...).

    Returns
    -------
    str or None
        ``"<prefix>.<field> '<path>' cannot be read: <reason>"`` for the first unreadable
        file, None when every configured file can be read.
    """
    for field in ("certificate", "private_key", "ca_file"):
        path = getattr(settings, field)
        if path is None:
            continue
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            return f"{prefix}.{field} {str(path)!r} cannot be read: {exc.strerror or exc}"
    return None


def settings_problem(
    tls: TLSSettings, key: str, build: Callable[[TLSSettings], ssl.SSLContext]
) -> str | None:
    """Why ``tls`` cannot be used (a file unreadable, or no context built from it), or None.

    Parameters
    ----------
    tls : TLSSettings
        The settings to check.
    key : str
        Their name in the configuration (``"tls"``, ``"destinations.pacs.tls"``).
    build : callable
        :func:`server_ssl_context` or :func:`client_ssl_context`, run once on ``tls``.

    Returns
    -------
    str or None
        A one-line message naming the setting (and the file), None when usable.
    """
    problem = unreadable_files(tls, key)
    if problem is not None:
        return problem
    try:
        build(tls)
    except (ValueError, ssl.SSLError, OSError) as exc:
        return f"{key}: {exc}"
    return None


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build the receiver's TLS context (TLS 1.2 or newer, BCP 195 ciphers).

    Parameters
    ----------
    tls : TLSSettings
        ``certificate`` and ``private_key`` are required; ``ca_file`` is required when
        ``require_client_certificate`` is set and is then the only trust anchor for clients.

    Returns
    -------
    ssl.SSLContext
        A server-side context.

    Raises
    ------
    TypeError
        When ``tls`` is not a TLSSettings.
    ValueError
        When a required file is missing.
    """
    if not isinstance(tls, TLSSettings):
        raise TypeError(f"tls must be TLSSettings, got {type(tls).__name__}")
    certificate = _check_file(tls.certificate, "certificate")
    private_key = _check_file(tls.private_key, "private_key")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(str(certificate), str(private_key))
    if tls.require_client_certificate:
        context.load_verify_locations(cafile=str(_check_file(tls.ca_file, "ca_file")))
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        # A client certificate is checked when offered, but not demanded
        context.load_verify_locations(cafile=str(_check_file(tls.ca_file, "ca_file")))
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build a destination's TLS context: verify the server (``ca_file`` or the system store).

    Parameters
    ----------
    tls : TLSSettings
        ``ca_file`` (optional: the system trust store otherwise); ``certificate`` and
        ``private_key`` (optional, both or neither) are our client certificate.

    Returns
    -------
    ssl.SSLContext
        A client-side context that checks the server's certificate and host name.

    Raises
    ------
    TypeError
        When ``tls`` is not a TLSSettings.
    ValueError
        When only one of certificate and private key is given, or a file is missing.
    """
    if not isinstance(tls, TLSSettings):
        raise TypeError(f"tls must be TLSSettings, got {type(tls).__name__}")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(_check_file(tls.ca_file, "ca_file")))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (tls.certificate is None) != (tls.private_key is None):
        raise ValueError(
            "tls.certificate and tls.private_key go together, got "
            f"certificate={tls.certificate!r}, private_key={tls.private_key!r}"
        )
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(
            str(_check_file(tls.certificate, "certificate")),
            str(_check_file(tls.private_key, "private_key")),
        )
    return context
