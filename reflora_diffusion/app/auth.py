"""The login in front of every route, not only the ones gradio guards.

gradio 6.31 checks the login on the page config, the API calls, the queue and file routes, but leaves
some routes open without it: POST /gradio_api/cancel and /gradio_api/reset answer success, the
run-history page /gradio_api/runs and the login page itself embed the app's API description (with the
choices and defaults of its components). With a login this middleware answers 401 to every request
without a valid session cookie, except the login page (`/`), the login form and static assets.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketClose

# gradio's launch() itself calls startup-events (it runs the startup events once and answers true/false)
PUBLIC_PATHS = {"/", "/login", "/login/", "/favicon.ico", "/manifest.json", "/robots.txt", "/theme.css",
                "/gradio_api/theme.css", "/gradio_api/startup-events"}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def logged_in(conn: HTTPConnection) -> bool:
    """The same test as gradio's own login check: a session cookie gradio issued at /login."""
    app = conn.scope.get("app")  # gradio's App; without its attributes (another gradio?) nobody gets in
    cookie_id = getattr(app, "cookie_id", None)
    token = (conn.cookies.get(f"access-token-{cookie_id}")
             or conn.cookies.get(f"access-token-unsecure-{cookie_id}"))
    return token is not None and getattr(app, "tokens", {}).get(token) is not None


class LoginRequired:
    """ASGI middleware for an app launched with a login: 401 (or a closed websocket) for everything but
    the public paths until the user has logged in."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not is_public(scope["path"]):
            conn = HTTPConnection(scope)
            if not logged_in(conn):
                if scope["type"] == "websocket":
                    response = WebSocketClose(code=1008)
                else:
                    response = JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def login_required_middleware() -> Middleware:
    """For `demo.launch(..., app_kwargs={"middleware": [login_required_middleware()]})`."""
    return Middleware(LoginRequired)
