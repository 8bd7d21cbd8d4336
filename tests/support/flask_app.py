"""A small Flask app that uses absolute paths everywhere, for the HTTP tunnel tests.

``/`` redirects to ``/login`` until signed in (Flask's ``redirect``: ``Location:
/login``); the login form posts to ``/login``, which sets the session cookie (``Path=/``)
and redirects to ``/``; the home page links ``/static/app.js`` (root-relative), whose
script writes into the page. Served by Werkzeug's threaded server on 127.0.0.1, a real
HTTP/1.1 server in its own thread.
"""
from __future__ import annotations

import threading
from typing import Any

from flask import Flask, redirect, request, session, url_for
from markupsafe import escape
from werkzeug.serving import make_server

__all__ = ["FlaskServer", "make_app"]

HOME = """<!doctype html><html><head><title>flask home</title></head><body>
<p id="who">hello {user}</p>
<p id="script">script: pending</p>
<a id="logout" href="/logout">log out</a>
<script src="/static/app.js"></script>
</body></html>"""

LOGIN = """<!doctype html><html><head><title>flask login</title></head><body>
<form id="form" method="post" action="{action}">
<input id="user" name="user"><button id="go" type="submit">log in</button>
</form></body></html>"""

APP_JS = "document.getElementById('script').textContent = 'script: ran';\n"


def make_app(form_action: str = "/login") -> Flask:
    """The app; ``form_action`` is where the login form posts (``/login``: an absolute
    path, which only a tunnel with a host of its own can serve)."""
    app = Flask("relay-test-flask")
    app.secret_key = "relay-test-only"

    @app.get("/")
    def index() -> Any:
        if "user" not in session:
            return redirect("/login")
        return HOME.format(user=escape(session["user"]))

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        if request.method == "POST":
            session["user"] = request.form["user"]
            return redirect(url_for("index"))
        return LOGIN.format(action=form_action)

    @app.get("/absolute")
    def absolute() -> Any:  # an absolute redirect built from the Host the app was sent
        return redirect(url_for("login", _external=True))

    @app.get("/host")
    def host() -> Any:
        return request.host

    @app.get("/logout")
    def logout() -> Any:
        session.clear()
        return redirect("/login")

    @app.get("/static/app.js")
    def app_js() -> Any:
        return APP_JS, 200, {"Content-Type": "text/javascript"}

    return app


class FlaskServer:
    """``with FlaskServer() as server``: the app on ``server.port`` until the block ends."""

    def __init__(self, form_action: str = "/login") -> None:
        self._server = make_server("127.0.0.1", 0, make_app(form_action), threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FlaskServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._thread.join(10)
