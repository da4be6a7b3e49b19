"""The HTTP plumbing of `jaxlm serve` around FastAPI: OpenAI's error body for every error (validation
errors are 400, not FastAPI's 422, in the answers and in /openapi.json), the API-key and body-size guard
that runs before anything is parsed, and running the app (in this process, or in a thread for tests and
benchmarks)."""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxlm.infer.protocol import APIError

log = logging.getLogger("jaxlm.serve")
PUBLIC = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def install(app: FastAPI):
    """OpenAI error bodies for every exception, and the schema that says so."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = lambda: _openapi(app)


# ----------------------------------------------------------------------------- errors
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with the errors this server really answers (OpenAI's body; 400, not 422)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error = {"content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for ops in spec.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if "requestBody" in op or "parameters" in op:
                    responses["400"] = {"description": "invalid request", **error}
        spec.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        spec.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = spec
    return app.openapi_schema


def _error_response(err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(request, exc: APIError):
    log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return _error_response(exc)


async def _validation_error(request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        err = APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}")
    else:
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union's branch names (str, list[...]) in loc are noise for the user
        loc = [x for x in loc if not any(ch in x for ch in "[]") and x not in ("str", "int", "float", "bool")]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        err = APIError(400, f"{param}: {msg}" if param else msg, param=param)
    return await _api_error(request, err)


async def _http_error(request, exc: StarletteHTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return await _api_error(request, APIError(exc.status_code, str(exc.detail), type=kind))


async def _internal_error(request, exc: Exception):
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error_response(APIError(500, "internal server error", type="server_error"))


class Guard:
    """ASGI wrapper: the API key (401) and the request-size cap (413) before anything is parsed."""

    def __init__(self, app, api_key, max_bytes):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    def __getattr__(self, name):  # app.state, app.openapi(), ... of the wrapped FastAPI app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") not in PUBLIC:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                err = APIError(401, "Incorrect or missing API key (Authorization: Bearer KEY)",
                               code="invalid_api_key")
                log.info("%s %s -> 401", scope.get("method"), scope.get("path"))
                return await _error_response(err)(scope, receive, send)
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            return await self._too_large(scope, receive, send)
        if "content-length" in headers or scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, more = b"", True  # a chunked body: read it (up to the cap) before the app sees it
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        err = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="request_too_large")
        return await _error_response(err)(scope, receive, send)


# ----------------------------------------------------------------------------- running it
def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Run an ASGI app in this process until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


class Background:
    """An ASGI app in a thread of this process (tests, benchmarks): `with Background(app, port) as bg: bg.url`."""

    def __init__(self, app, port: int, host: str = "127.0.0.1"):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        self.uv = uvicorn.Server(self.config)
        self.url = f"http://{host}:{port}"
        self.thread = None

    def __enter__(self):
        import threading

        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.uv.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.uv.should_exit = True
        self.thread.join(timeout=30)
