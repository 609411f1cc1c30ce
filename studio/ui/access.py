"""Login for every route: with --auth, Gradio 6 leaves some routes that act on jobs open (/cancel, /reset,
/stream, /heartbeat, ...); this ASGI middleware refuses every request without the login cookie except the few
the login page itself needs."""

from __future__ import annotations

import json
import re
from http.cookies import SimpleCookie

# what a browser must reach before it has logged in: the page shell, its static files, the login form; and
# startup-events, which launch() itself calls (it runs the app's load-once events, idempotent)
PUBLIC = re.compile(r"^/(|login/?|logout|favicon\.ico|robots\.txt|manifest\.json|theme\.css|pwa_icon(/\d+)?"
                    r"|(svelte|static|assets)/.*"
                    r"|gradio_api/(login_check|app_id|token|user|theme\.css|startup-events)/?)$")


def is_public(path: str) -> bool:
    return bool(PUBLIC.match(path))


class LoginRequired:
    """Pure ASGI middleware: a request to a non-public path needs the user Gradio's own login would find."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not is_public(scope.get("path", "")):
            gradio_app = scope.get("app")
            if getattr(gradio_app, "auth", None) is not None and _user(gradio_app, scope) is None:
                await _refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _user(gradio_app, scope) -> str | None:
    """The logged-in user of this request, by the cookie Gradio sets at /login (None if none)."""
    headers = dict(scope.get("headers") or [])
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed Cookie header is no login
        return None
    cookie_id = getattr(gradio_app, "cookie_id", "")
    tokens = getattr(gradio_app, "tokens", {}) or {}
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        if name in cookies and cookies[name].value in tokens:
            return tokens[cookies[name].value]
    return None


async def _refuse(scope, receive, send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"detail": "Not authenticated: log in first"}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
