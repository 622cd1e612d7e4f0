"""The HTTP server of `tinylm serve`: OpenAI's completions API, the playground page and its endpoints.

  GET  /                  the playground (static/playground.html: one file, no external resources)
  GET  /health            {"status": "ok", ...} and what the decoding threads are doing
  GET  /v1/models         one entry per served model (`--rev` may be given several times)
  POST /v1/completions    OpenAI's text completions, streamed as server-sent events with stream true
  POST /v1/score          a text's tokens, each with its loss and the model's alternatives, and the
                          text's loss, perplexity and bits per byte (`tinylm score`'s numbers)
  POST /v1/attention      one layer's and head's attention over a text

`model` in a request picks a served model by its id (default: the first). Every refusal is
OpenAI's error body with its status: 400 for a bad field or malformed JSON, 404 for an unknown
path, 413 for a body over MAX_BODY_BYTES; an unexpected error is a 500 with one line, and the
server keeps serving.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinylm.cli.models import Loaded
from tinylm.serve import completions
from tinylm.serve.analysis import AttentionProbe, score_view
from tinylm.serve.schemas import APIError, AttentionRequest, CompletionRequest, Request as ModelRequest, ScoreRequest
from tinylm.serve.workers import Workers

MAX_BODY_BYTES = 1 << 20  # a prompt fits in a block_size of tokens; a text to score in a MiB


@dataclass(frozen=True)
class Served:
    id: str  # what `model` in a request names it by
    loaded: Loaded
    created: int  # when it was loaded (Unix time), OpenAI's `created`
    probe: AttentionProbe

    @classmethod
    def of(cls, model_id: str, loaded: Loaded) -> Served:
        return cls(model_id, loaded, int(time.time()), AttentionProbe(loaded))

    def card(self) -> dict:
        """Its /v1/models entry: OpenAI's fields, then what the playground needs to draw its controls."""
        config = self.loaded.model.config
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "tinylm",
                "source": self.loaded.label, "block_size": config.block_size, "n_layer": config.n_layer,
                "n_head": config.n_head, "vocab_size": config.vocab_size}


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413: by its Content-Length, or a chunked one (no
    length) once that much has come, read here in full before the app sees it.

    The rest of a refused body is read and dropped first (up to DRAIN_BYTES): a client still sending
    it when the answer comes would see its connection reset instead of reading the 413."""

    DRAIN_BYTES = 64 << 20

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) <= self.limit:
                return await self.app(scope, receive, send)  # the server reads no more than that
            return await self.refuse(scope, receive, send, more=True)
        messages, received = [], 0
        while not messages or messages[-1].get("more_body", False):
            messages.append(await receive())
            received += len(messages[-1].get("body", b""))
            if received > self.limit:
                return await self.refuse(scope, receive, send, messages[-1].get("more_body", False))

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope: Scope, receive: Receive, send: Send, more: bool) -> None:
        drained = 0
        while more and drained < self.DRAIN_BYTES:
            message = await receive()
            more = message.get("more_body", False)
            drained += len(message.get("body", b""))
        error = APIError(413, f"the request body is over {self.limit} bytes: send a shorter prompt or text",
                         code="request_too_large")
        await error_response(error)(scope, receive, send)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    # loc is ("body", field, ...): after the field come a union's member types and list indexes.
    param = str(first["loc"][1]) if len(first["loc"]) > 1 else None
    return APIError(400, f"{param or 'the request body'}: {first['msg']}", param=param)


def create_app(served: list[Served], workers: Workers) -> ASGIApp:
    by_id = {model.id: model for model in served}
    playground = files("tinylm.serve").joinpath("static/playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        workers.close()

    app = FastAPI(title="tinylm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def pick(request: ModelRequest) -> Served:
        if request.model is None:
            return served[0]
        if request.model not in by_id:
            raise APIError(400, f"model {request.model!r} is not served here; served: {', '.join(by_id)}",
                           param="model", code="model_not_found")
        return by_id[request.model]

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"no {request.method} {request.url.path} here" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        # Starlette then re-raises it, so the server's log gets the traceback; the client gets one line.
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return playground

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(by_id), "running": workers.running,
                "stopped_early": workers.stopped_early}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model.card() for model in served]}

    @app.post("/v1/completions")
    async def complete(request: CompletionRequest):
        model = pick(request)
        if request.stream:
            events = completions.plan_stream(request, model.id, model.loaded, workers)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await completions.complete(request, model.id, model.loaded, workers)

    @app.post("/v1/score")
    async def score(request: ScoreRequest) -> dict:
        model = pick(request)
        return {"model": model.id, **await workers.call(score_view, model.loaded, request.text, request.top)}

    @app.post("/v1/attention")
    async def attention(request: AttentionRequest) -> dict:
        model = pick(request)
        return {"model": model.id, **await workers.call(model.probe.view, request.text, request.layer, request.head)}

    return BodyLimit(app, MAX_BODY_BYTES)
