"""`lorafit ui`: the whole job in a local web app, on lorafit's own stages.

    lorafit ui --workspace my-project          # then open http://127.0.0.1:7860/

Pages are rendered on the server (Jinja2 templates shipped in the package) with a little
JavaScript: server-sent events for training progress and chat, an SVG chart. Every stage runs
through lorafit's own functions or as a `lorafit` subprocess (training, evaluation, export), so
the app holds no second copy of validation, evaluation or export, and a job survives the tab
or the app being closed (lorafit.ui.workspace).

Security: loopback by default; any other --host needs a token (``?token=`` once, then a
cookie); every request must be addressed to an allowed host name (no DNS rebinding); every
state-changing request carries the page's CSRF token in a header a cross-site page cannot
send; uploads are size-limited and parsed before anything is written; every path stays
inside the workspace.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)

from lorafit.errors import LorafitError
from lorafit.ui.workspace import Workspace, safe_name

log = logging.getLogger(__name__)
MAX_UPLOAD = 2_000_000
SCREENS = (
    ("/", "Knowledge"),
    ("/plan", "Plan"),
    ("/train", "Train"),
    ("/results", "Results"),
    ("/try", "Try it"),
    ("/ship", "Ship"),
    ("/runs", "Runs"),
)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "lorafit_ui"


def _templates():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("lorafit", "resources/ui/templates"),
        autoescape=True,
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class UI:
    """The app's state: the workspace, its security secrets, loaded chat models."""

    def __init__(self, workspace: Path, token: str | None, hosts: set[str] | None):
        self.ws = Workspace(workspace)
        self.token, self.hosts = token, hosts
        self.csrf = secrets.token_urlsafe(24)
        self.templates = _templates()
        self.chat_lock = threading.Lock()
        self.loaded: dict[str, object] = {}  # run -> lorafit.inference.Loaded (the last one)

    def page(self, template: str, title: str, request: Request, **values) -> HTMLResponse:
        query = ""
        for key in ("run", "glossary"):
            if request.query_params.get(key):
                query = f"?{key}={request.query_params[key]}"
        html = self.templates.get_template(f"{template}.html").render(
            title=title, screens=SCREENS, csrf=self.csrf, query=query, **values
        )
        return HTMLResponse(html)

    # --- security ----------------------------------------------------------------------
    async def guard(self, request: Request, call_next):
        if self.hosts is not None and request.headers.get("host", "") not in self.hosts:
            return _error(403, "this app only answers requests addressed to its own host name")
        if self.token:
            sent = request.query_params.get("token") or request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(sent.encode(), self.token.encode()):
                return _error(401, "open the URL with the token lorafit ui printed")
            if request.query_params.get("token"):  # once: then a cookie, not the URL
                response = RedirectResponse(request.url.path, status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                return response
        if request.method == "POST":
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
                return _error(403, "missing or wrong CSRF token: reload the page")
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            if kind not in ("application/json", "application/octet-stream"):
                return _error(415, "send JSON")
            size = request.headers.get("content-length", "")
            if size.isdigit() and int(size) > MAX_UPLOAD:
                return _error(413, f"over the {MAX_UPLOAD // 1_000_000} MB limit")
        try:
            return await call_next(request)
        except LorafitError as e:
            return _error(400, str(e))

    async def body(self, request: Request) -> bytes:
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_UPLOAD:
                raise LorafitError(f"over the {MAX_UPLOAD // 1_000_000} MB limit")
        return data

    async def json(self, request: Request) -> dict:
        try:
            data = json.loads(await self.body(request))
        except (ValueError, RecursionError):
            raise LorafitError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise LorafitError("expected a JSON object")
        return data

    def run_name(self, request: Request, data: dict | None = None) -> str | None:
        name = (data or {}).get("run") or request.query_params.get("run")
        if name:
            return safe_name(name, "run")
        runs = self.ws.runs()
        return runs[0] if runs else None


def build_app(workspace: Path, token: str | None = None, hosts: set[str] | None = None):
    """The app for ``workspace``. ``hosts``: the Host headers it answers (None: any)."""
    from lorafit.shipped import shipped
    from lorafit.ui import api, screens

    ui = UI(workspace, token, hosts)
    app = FastAPI(title="lorafit ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(ui.guard)
    for path, page in (
        ("/", screens.knowledge),
        ("/plan", screens.plan),
        ("/train", screens.train),
        ("/results", screens.results),
        ("/try", screens.try_it),
        ("/ship", screens.ship),
        ("/runs", screens.runs),
    ):
        app.get(path, response_class=HTMLResponse)(_bind(page, ui))
    for path, action in (
        ("/api/glossary/upload", api.upload),
        ("/api/glossary/paste", api.paste),
        ("/api/glossary/save", api.save),
        ("/api/data/generate", api.generate),
        ("/api/estimate", api.estimate),
        ("/api/train/start", api.start_training),
        ("/api/train/stop", api.stop_training),
        ("/api/eval/start", api.start_eval),
        ("/api/export/start", api.start_export),
        ("/api/chat", api.chat),
    ):
        app.post(path)(_bind(action, ui))

    async def resume(request: Request):
        return await api.start_training(ui, request, resume=True)

    app.post("/api/train/resume")(resume)
    app.get("/api/train/events")(_bind(api.train_events, ui))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in ("app.css", "app.js"):
            return _error(404, "no such file")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(shipped(f"ui/static/{name}").read_bytes(), media_type=kind)

    @app.get("/files/{relative:path}")
    def files(relative: str):
        path = ui.ws.inside(relative)  # refuses '..', absolute paths, symlinks out
        if not path.is_file():
            return _error(404, f"{relative}: no such file in the workspace")
        return FileResponse(path, filename=path.name)

    return app


def _bind(function, ui):
    """A route handler calling ``function(ui, request)`` (sync or async)."""
    import inspect

    if inspect.iscoroutinefunction(function):

        async def handler(request: Request):
            result = await function(ui, request)
            return result if isinstance(result, Response) else JSONResponse(result)

    else:

        def handler(request: Request):
            return function(ui, request)

    handler.__name__ = function.__name__
    return handler


def ui_app(workspace: Path, host: str, port: int, token: str | None):
    """(the app, the URL to open): off loopback a token is always required (one is made up
    when none is given)."""
    if host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(18)  # never an open app on the network
    names = {*LOOPBACK, host}
    hosts = {f"[{n}]" if ":" in n else n for n in names}
    hosts |= {f"{h}:{port}" for h in hosts}
    url = f"http://{'localhost' if host in LOOPBACK else host}:{port}/"
    if token:
        url += f"?token={token}"
    # with a token a rebinding page cannot get in (it holds no cookie for its own host name);
    # without one, only requests addressed to loopback or the bound address are answered
    return build_app(Path(workspace), token, None if token else hosts), url
