"""JSON answers shared by the HTTP endpoints: every API refuses in one shape.

``{"error": "<code>", "message": "<text>"}`` — ``code`` for programs, ``message`` for
people; never a stack trace. (``POST /api/messages`` answers a client message the
way the WebSocket does instead: ``{"type": "error", "code", "message", "ref"}``.)
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An HTTP error answer with ``code`` and ``message``."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)
