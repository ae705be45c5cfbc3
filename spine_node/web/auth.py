"""Who may use the web page and change state through it: token, session cookie, CSRF.

Rules (docs/security.md, threat T7):

- ``web.token_file`` holds the access token. With it, every page needs it: the login form
  takes the token and sets a signed session cookie (``HttpOnly``, ``SameSite=Strict``);
  API clients send ``Authorization: Bearer TOKEN``.
- Without a token the pages are read-only: every state-changing request (feedback, replay)
  is refused, and :func:`check_exposure` refuses a non-loopback ``bind_address`` unless
  HTTPS requires a client certificate (``web.require_client_certificate``).
- A state-changing request made with the session cookie must carry the CSRF token of that
  session (a hidden form field, synchronizer pattern), and its ``Origin``, when sent, must be
  this server. A bearer-token request needs no CSRF token: browsers never add that header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spine_node.config import WebSettings

#: Name of the session cookie.
SESSION_COOKIE = "spine_node_session"
#: Name of the form field holding the CSRF token.
CSRF_FIELD = "csrf_token"


class TokenFileError(ValueError):
    """``web.token_file`` cannot be read or holds no token (message names the path)."""


def read_token(path: Path) -> str:
    """Read the access token: the file's text with surrounding whitespace removed.

    Raises
    ------
    TokenFileError
        When the file cannot be read, or the token is shorter than 16 characters.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TokenFileError(f"web.token_file {str(path)!r} cannot be read: {reason}") from None
    if len(token) < 16:
        raise TokenFileError(
            f"web.token_file {str(path)!r} holds a token of {len(token)} characters; use at "
            "least 16 (e.g. `openssl rand -hex 32`)"
        )
    return token


def check_exposure(web: WebSettings, loopback: bool) -> None:
    """Refuse to serve beyond this host without authentication.

    Parameters
    ----------
    web : WebSettings
        The ``[web]`` settings.
    loopback : bool
        Whether ``web.bind_address`` is a loopback address.

    Raises
    ------
    ValueError
        When the address is not loopback and neither ``token_file`` nor a required client
        certificate is configured.
    """
    if not loopback and web.token_file is None and not web.require_client_certificate:
        raise ValueError(
            f"web.bind_address = {web.bind_address!r} is reachable from other hosts but no "
            "authentication is configured: set web.token_file (or HTTPS with "
            "web.require_client_certificate; docs/security.md) or bind to 127.0.0.1"
        )


@dataclass
class Guard:
    """Checks tokens, signs session cookies and CSRF tokens.

    Parameters
    ----------
    token : str or None
        The access token (None: no authentication configured; nothing may change state).
    max_age_s : float
        How long a session cookie stays valid.
    clock : callable
        Current time in epoch seconds.
    secret : bytes
        Signs sessions and CSRF tokens; random per process, so a restart ends all sessions.
    """

    token: str | None
    max_age_s: float
    clock: Callable[[], float] = time.time
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def enabled(self) -> bool:
        """True when a token is configured (login needed, state changes possible)."""
        return self.token is not None

    def _sign(self, purpose: str, message: str) -> str:
        return hmac.new(self.secret, f"{purpose}:{message}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, presented: str | None) -> bool:
        """True when ``presented`` is the configured token (constant-time comparison)."""
        if self.token is None or not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def bearer_ok(self, authorization: str | None) -> bool:
        """True for an ``Authorization: Bearer TOKEN`` header with the configured token."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())

    def new_session(self) -> str:
        """A session cookie value: ``expiry.nonce.signature``."""
        body = f"{int(self.clock() + self.max_age_s)}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign('session', body)}"

    def session_ok(self, value: str | None) -> bool:
        """True for a session cookie this process signed that has not expired."""
        if self.token is None or not value or value.count(".") != 2:
            return False
        body, _, signature = value.rpartition(".")
        if not hmac.compare_digest(signature, self._sign("session", body)):
            return False
        expiry = body.split(".", 1)[0]
        return expiry.isdigit() and int(expiry) > self.clock()

    def csrf_token(self, session: str) -> str:
        """The CSRF token of a session (bound to it: useless with another cookie)."""
        return self._sign("csrf", session)

    def csrf_ok(self, session: str | None, presented: str | None) -> bool:
        """True when ``presented`` is the CSRF token of the valid ``session``."""
        if not self.session_ok(session) or not presented:
            return False
        assert session is not None
        return hmac.compare_digest(presented, self.csrf_token(session))
