"""The web application (FastAPI): the HTML page and the JSON API beside it.

Routes (docs/serve.md has the details)::

    GET  /                      the page (``?run=NAME`` chooses a run)
    POST /ground                HTML: multipart run, image, text -> the image with the box drawn
    GET  /search                HTML: ?run, text, k -> the ranked videos
    GET  /frames/RUN/VIDEO/I    JPEG thumbnail I of a video (ids from the server's own tables only)
    GET  /api/runs              JSON: the loaded runs
    POST /api/ground            JSON: multipart run, image, text (repeatable), draw
    POST /api/search            JSON body {"run", "text", "k"}
    GET  /healthz               JSON: {"status": "ok", "runs": N}

Every refusal has its HTTP status and a message (JSON ``{"error", "status"}`` on the API, the page
with the message on HTML routes): 400 bad input, 404 unknown run / video / route, 413 too large,
415 not a supported image, 500 the model failed (the server goes on answering).
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Sequence
from html import escape
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import GroundkitError
from .images import InputError, Limits, decode_upload, draw_boxes, encode_png, size_text
from .pages import SCRIPT, STYLE, frame_url, render_page
from .table import ServedRun

__all__ = ["create_app", "BodyLimit", "HostCheck", "host_name"]

log = logging.getLogger("groundkit.serve")

#: room for the multipart envelope and the text fields around an upload
FORM_OVERHEAD = 64 * 1024
#: an oversized body up to this size is read and dropped before the 413 (beyond it, the connection closes)
DRAIN_BYTES = 64 * 1024 * 1024

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _wants_json(path: str) -> bool:
    return path.startswith(("/api/", "/healthz", "/frames/"))


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 without being read whole
    (by its Content-Length, or while it streams in when it has none); adds the security headers."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _drain(self, receive: Receive, seen: int) -> None:
        """Read and drop the rest of an oversized body (up to DRAIN_BYTES), so that the client, still
        sending, gets to read the 413 rather than a reset connection."""
        while seen <= DRAIN_BYTES:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def _refuse(self, scope: Scope, send: Send) -> None:
        msg = f"the request is larger than {size_text(self.max_bytes)} (the upload limit plus the form around it)"
        await _send_error(scope, send, 413, msg)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await _send_error(scope, send, 400, "malformed Content-Length header")
                return
            if n > self.max_bytes:
                if n <= DRAIN_BYTES:
                    await self._drain(receive, 0)
                await self._refuse(scope, send)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyLimit._TooLarge
            return msg

        async def secured_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                have = {k.lower() for k, _ in msg.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in have]
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            await send(msg)

        try:
            await self.app(scope, limited_receive, secured_send)
        except BodyLimit._TooLarge:
            if not started:
                await self._drain(receive, seen)
                await self._refuse(scope, send)


def host_name(header: str) -> str:
    """The host of a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: a request whose Host header names none of ``allowed`` is answered 400 (against
    DNS rebinding: a page of another site resolving its own name to 127.0.0.1)."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app = app
        self.allowed = {host_name(h) if h.startswith("[") else h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                await _send_error(scope, send, 400, f"this server answers only to {', '.join(sorted(self.allowed))}")
                return
        await self.app(scope, receive, send)


async def _send_error(scope: Scope, send: Send, status: int, message: str) -> None:
    if _wants_json(scope.get("path", "")):
        resp: Response = JSONResponse({"error": message, "status": status}, status_code=status)
    else:
        resp = HTMLResponse(_error_html(status, message), status_code=status)
    resp.headers.update(SECURITY_HEADERS)

    async def _empty() -> Message:
        return {"type": "http.disconnect"}

    await resp(scope, _empty, send)


def _error_html(status: int, message: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>groundkit: error {status}</title>'
        f'<link rel="stylesheet" href="/style.css"></head><body><header><h1>groundkit</h1></header><main>'
        f'<div id="error" class="card error" role="alert">{escape(message)}</div>'
        '<p><a href="/">Back to the page</a></p></main></body></html>'
    )


class _State:
    def __init__(self, runs: Sequence[ServedRun], limits: Limits):
        self.runs = list(runs)
        self.by_name = {r.name: r for r in self.runs}
        self.limits = limits

    def run(self, name: Any, kind: str | None = None) -> ServedRun:
        if not isinstance(name, str) or not name:
            if len(self.runs) == 1:  # one run: naming it is optional
                name = self.runs[0].name
            else:
                raise InputError(400, "choose a run (the 'run' field); loaded runs: " + self.names())
        run = self.by_name.get(name)
        if run is None:
            shown = name if len(name) <= 80 else name[:80] + "\u2026"
            raise InputError(404, f"unknown run {shown!r}; loaded runs: {self.names()}")
        if kind is not None and run.kind != kind:
            what = {"image_text": "image grounding", "text_video": "video search"}.get(kind, kind)
            raise InputError(400, f"run {run.name!r} is a {run.kind} model; it does not do {what}")
        return run

    def names(self) -> str:
        return ", ".join(r.name for r in self.runs) or "none"

    def texts(self, values: Sequence[Any]) -> list[str]:
        texts = [v.strip() if isinstance(v, str) else "" for v in values]
        if not texts or not any(texts):
            raise InputError(400, "the expression is empty: type what to look for")
        if len(texts) > self.limits.max_texts:
            raise InputError(400, f"{len(texts)} expressions; at most {self.limits.max_texts} at a time")
        for t in texts:
            if not t:
                raise InputError(400, "one of the expressions is empty")
            if len(t) > self.limits.max_text:
                raise InputError(
                    400, f"the expression is {len(t)} characters long; the limit is {self.limits.max_text}"
                )
            if any(ord(c) < 32 and c not in "\t\n\r" for c in t):
                raise InputError(400, "the expression holds control characters")
        return texts

    def k(self, value: Any) -> int:
        if value is None or value == "":
            return 10
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            value = "not a whole number"
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise InputError(400, f"k must be a whole number from 1 to {self.limits.max_k}") from None
        if not 1 <= k <= self.limits.max_k:
            raise InputError(400, f"k must be from 1 to {self.limits.max_k}; got {k}")
        return k

    async def call(self, run: ServedRun, fn: Any, *args: Any) -> Any:
        """A model call in a worker thread, one at a time per run; an exception becomes a 500."""

        def locked() -> Any:
            with run.lock:
                return fn(*args)

        try:
            return await anyio.to_thread.run_sync(locked)
        except InputError:
            raise
        except GroundkitError as e:  # the predictor refused this input (an unknown query ...): the client's to fix
            raise InputError(400, str(e)) from e
        except Exception as e:
            log.exception("run %s: the model failed", run.name)
            raise InputError(500, f"the model of run {run.name!r} failed on this input: {type(e).__name__}: {e}") from e


def _check_ground(run: ServedRun, texts: list[str], out: Any) -> list[dict[str, Any]]:
    """The predictor's answer as clean JSON, or a 500 naming what is wrong with it."""
    if not isinstance(out, (list, tuple)) or len(out) != len(texts):
        raise InputError(
            500, f"the model of run {run.name!r} answered {type(out).__name__}, not one result per expression"
        )
    clean = []
    for t, r in zip(texts, out):
        box = r.get("box") if isinstance(r, dict) else None
        try:
            box = [float(v) for v in box]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            box = None
        if box is None or len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise InputError(500, f"the model of run {run.name!r} gave no valid box for {t!r}")
        score = r.get("score")
        score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
        clean.append({"text": t, "box": box, "score": score})
    return clean


def _check_search(run: ServedRun, out: Any) -> list[tuple[str, float]]:
    try:
        hits = [(str(v), float(s)) for v, s in out]
    except (TypeError, ValueError):
        raise InputError(
            500, f"the model of run {run.name!r} answered something other than (video id, score) pairs"
        ) from None
    return hits


class _Routes:
    """The route handlers of one application, bound to its runs and limits (:class:`_State`)."""

    def __init__(self, state: _State):
        self.state, self.limits = state, state.limits

    # ------------------------------------------------------------------ errors
    def error_response(self, request: Request, status: int, message: str) -> Response:
        """A refusal: JSON on the API, the page with the message (and the user's input) on HTML routes."""
        if _wants_json(request.url.path):
            return JSONResponse({"error": message, "status": status}, status_code=status)
        current = getattr(request.state, "run", None)
        form = getattr(request.state, "form_values", {})
        html = render_page(self.state.runs, self.limits, current, error=message, **form)
        return HTMLResponse(html, status_code=status)

    async def input_error(self, request: Request, exc: InputError) -> Response:
        """Bad input (or a failed model call) with its own status and message."""
        return self.error_response(request, exc.status, exc.message)

    async def http_error(self, request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's refusals (unknown route, wrong method, unparsable form) in the same shape as ours."""
        message = {404: "no such page", 405: "method not allowed here"}.get(exc.status_code, str(exc.detail))
        if exc.status_code == 400 and exc.detail:
            message = f"malformed request: {exc.detail}"
        return self.error_response(request, exc.status_code, message)

    async def validation_error(self, request: Request, exc: RequestValidationError) -> Response:
        """A parameter FastAPI could not convert: a plain 400."""
        return self.error_response(request, 400, "malformed request")

    async def unexpected(self, request: Request, exc: Exception) -> Response:
        """Any other exception: logged, answered 500, and the server goes on."""
        log.exception("unexpected error on %s", request.url.path)
        return self.error_response(request, 500, f"internal error: {type(exc).__name__}")

    # ------------------------------------------------------------------ shared steps
    async def read_form(self, request: Request) -> Any:
        """The multipart form (one file at most, fields bounded by the number of expressions allowed)."""
        return await request.form(max_files=1, max_fields=2 * self.limits.max_texts + 8)

    async def ground(self, request: Request) -> tuple[ServedRun, dict[str, Any], Any]:
        """Check a grounding form, run the model on it: ``(run, JSON result, decoded image)``."""
        form = await self.read_form(request)
        run = self.state.run(form.get("run"), "image_text")
        request.state.run = run
        texts = form.getlist("text")
        request.state.form_values = {"text": texts[0] if texts and isinstance(texts[0], str) else ""}
        texts = self.state.texts(texts)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InputError(400, "no image was uploaded: choose an image file (the 'image' field)")
        data = await upload.read(self.limits.max_upload_bytes + 1)
        await upload.close()
        img = await anyio.to_thread.run_sync(decode_upload, data, self.limits)
        out = await self.state.call(run, run.predictor.ground, img, texts)
        result = {
            "run": run.name,
            "method": run.method,
            "width": img.width,
            "height": img.height,
            "results": _check_ground(run, texts, out),
        }
        return run, result, img

    async def drawn_png(self, img: Any, result: dict[str, Any]) -> bytes:
        """The image with the result's boxes drawn, as PNG (in a worker thread)."""
        return await anyio.to_thread.run_sync(
            lambda: encode_png(draw_boxes(img, result["results"], self.limits.display_side))
        )

    async def search(self, run_name: Any, text: Any, k: Any, request: Request) -> tuple[ServedRun, dict[str, Any]]:
        """Check a search query, run the model on it: ``(run, JSON result)`` with captions and frame links."""
        run = self.state.run(run_name, "text_video")
        request.state.run = run
        request.state.form_values = {"text": text if isinstance(text, str) else ""}
        k = self.state.k(k)
        request.state.form_values["k"] = k
        (text,) = self.state.texts([text])
        hits = _check_search(run, await self.state.call(run, run.predictor.search, text, k))
        results = []
        for rank, (vid, score) in enumerate(hits, 1):
            frames: list[str] = []
            if run.frames is not None and run.frames.has(vid):
                thumbs = await anyio.to_thread.run_sync(run.frames.thumbnails, vid)
                frames = [frame_url(run.name, vid, i) for i in range(len(thumbs))]
            caps = run.predictor.video_captions(vid)
            results.append(
                {"rank": rank, "video_id": vid, "score": score, "caption": caps[0] if caps else "", "frames": frames}
            )
        frames_on_disk = run.frames is not None and len(run.frames) > 0
        return run, {
            "run": run.name,
            "method": run.method,
            "text": text,
            "k": k,
            "frames_on_disk": frames_on_disk,
            "results": results,
        }

    # ------------------------------------------------------------------ HTML
    async def index(self, request: Request, run: str | None = None) -> Response:
        """The page, with ``?run=NAME`` chosen."""
        current = self.state.run(run) if run else None
        return HTMLResponse(render_page(self.state.runs, self.limits, current))

    async def ground_page(self, request: Request) -> Response:
        """The page with the uploaded image and its boxes."""
        run, result, img = await self.ground(request)
        png = await self.drawn_png(img, result)
        text = result["results"][0]["text"]
        return HTMLResponse(render_page(self.state.runs, self.limits, run, text=text, ground=(result, png)))

    async def search_page(self, request: Request) -> Response:
        """The page with the ranked videos of a query."""
        q = request.query_params
        run, result = await self.search(q.get("run"), q.get("text"), q.get("k"), request)
        page = render_page(self.state.runs, self.limits, run, text=result["text"], k=result["k"], search=result)
        return HTMLResponse(page)

    async def frame(self, run_name: str, video_id: str, index: str) -> Response:
        """One JPEG thumbnail of a video the run's frame table knows (nothing else is read)."""
        run = self.state.run(run_name, "text_video")
        if run.frames is None or not run.frames.has(video_id):
            raise InputError(404, f"no frames for video {video_id[:80]!r} in run {run.name!r}")
        thumbs = await anyio.to_thread.run_sync(run.frames.thumbnails, video_id)
        if not index.isdigit() or int(index) >= len(thumbs):
            raise InputError(404, f"video {video_id!r} has {len(thumbs)} frames; no frame {index[:20]!r}")
        return Response(thumbs[int(index)], media_type="image/jpeg")

    # ------------------------------------------------------------------ JSON API
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the number of loaded runs and the version."""
        return {"status": "ok", "runs": len(self.state.runs), "version": __version__}

    async def api_runs(self) -> dict[str, Any]:
        """The loaded runs and the limits a client must respect."""
        lim = self.limits
        return {
            "runs": [r.describe() for r in self.state.runs],
            "limits": {
                "max_upload_bytes": lim.max_upload_bytes,
                "max_pixels": lim.max_pixels,
                "max_text": lim.max_text,
                "max_texts": lim.max_texts,
                "max_k": lim.max_k,
            },
        }

    async def api_ground(self, request: Request) -> Response:
        """Grounding as JSON; ``draw`` adds the drawn image as base64 PNG."""
        run, result, img = await self.ground(request)
        form = await self.read_form(request)  # parsed once, cached by the request
        if str(form.get("draw", "")).lower() in ("1", "true", "yes", "on"):
            png = await self.drawn_png(img, result)
            result["image_png"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(result)

    async def api_search(self, request: Request) -> Response:
        """Search as JSON, from a JSON body ``{"run", "text", "k"}``."""
        try:
            body = await request.json()
        except Exception:
            raise InputError(400, 'the body must be JSON: {"run": NAME, "text": TEXT, "k": 10}') from None
        if not isinstance(body, dict):
            raise InputError(400, 'the body must be a JSON object: {"run": NAME, "text": TEXT, "k": 10}')
        _, result = await self.search(body.get("run"), body.get("text"), body.get("k"), request)
        return JSONResponse(result)


async def style() -> Response:
    """The page's stylesheet (served from here: the CSP allows no inline style)."""
    return Response(STYLE, media_type="text/css")


async def script() -> Response:
    """The page's script (served from here: the CSP allows no inline script)."""
    return Response(SCRIPT, media_type="text/javascript")


def _add_routes(app: FastAPI, routes: _Routes) -> None:
    """Register the error handlers and the routes listed in the module docstring."""
    app.exception_handler(InputError)(routes.input_error)
    app.exception_handler(StarletteHTTPException)(routes.http_error)
    app.exception_handler(RequestValidationError)(routes.validation_error)
    app.exception_handler(Exception)(routes.unexpected)
    app.add_api_route("/", routes.index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/ground", routes.ground_page, methods=["POST"], response_class=HTMLResponse)
    app.add_api_route("/search", routes.search_page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/style.css", style, methods=["GET"])
    app.add_api_route("/app.js", script, methods=["GET"])
    app.add_api_route("/frames/{run_name}/{video_id}/{index}", routes.frame, methods=["GET"])
    app.add_api_route("/healthz", routes.healthz, methods=["GET"])
    app.add_api_route("/api/runs", routes.api_runs, methods=["GET"])
    app.add_api_route("/api/ground", routes.api_ground, methods=["POST"])
    app.add_api_route("/api/search", routes.api_search, methods=["POST"])


def create_app(
    runs: Sequence[ServedRun], limits: Limits | None = None, allowed_hosts: Sequence[str] | None = None
) -> FastAPI:
    """The application for ``runs`` (already loaded). ``allowed_hosts``: Host header names accepted
    (None: any; ``groundkit serve`` on a loopback address passes the loopback names, so a web page on
    another site cannot reach the server through DNS rebinding: :class:`HostCheck`)."""
    limits = limits or Limits()
    state = _State(runs, limits)
    app = FastAPI(title="groundkit", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.groundkit = state
    _add_routes(app, _Routes(state))
    # outermost first: the body limit (and security headers) wraps the host check
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=list(allowed_hosts))
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + FORM_OVERHEAD)
    return app
