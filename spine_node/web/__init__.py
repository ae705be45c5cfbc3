"""The node's web face: a server-rendered status page, feedback and dead-letter replay.

:func:`create_app` builds the FastAPI application over an open queue; :func:`start_web`
serves it with uvicorn in a thread of the node process (the ``web`` role). Security rules
(token, sessions, CSRF, loopback-only without a token) are in :mod:`spine_node.web.auth`.
"""

from spine_node.web.app import create_app
from spine_node.web.server import WebServer, start_web

__all__ = ["WebServer", "create_app", "start_web"]
