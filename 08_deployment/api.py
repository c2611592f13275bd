"""The FastAPI app: OpenAI-shaped routes, SSE streaming, errors, auth and metrics around the scheduler.

``create_app(state)`` is used by server.py (CLI) and by the tests (uvicorn in a thread on a free port).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ch08.scheduler import Event, GenRequest
from ch08.schemas import ChatRequest, CompletionRequest, chat_prompt, error_body


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def create_app(state) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(state.scheduler.shutdown, state.shutdown_timeout)

    app = FastAPI(title="mini-GPT OpenAI-compatible server", lifespan=lifespan)
    app.state.llm = state
    m = state.metrics

    def count(endpoint: str, status: int, started: float | None = None):
        m.inc("requests_total", "HTTP requests by endpoint and status", endpoint=endpoint, status=str(status))
        if started is not None:
            m.observe(
                "request_latency_seconds",
                "request latency (to the last byte)",
                time.perf_counter() - started,
                endpoint=endpoint,
            )

    def error_response(request: Request, status: int, body: dict) -> JSONResponse:
        count(request.url.path, status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.body)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if err.get("type") == "json_invalid":
            return error_response(request, 400, error_body("request body is not valid JSON", code="invalid_json"))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {err['msg']}" if param else err["msg"]
        return error_response(request, 400, error_body(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, error_body(str(exc.detail), code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(request, 500, error_body(f"internal error: {exc}", "server_error"))

    async def authorize(request: Request):
        if state.api_key and request.headers.get("authorization", "") != f"Bearer {state.api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def make_request(
        body, prompt: str, default_stop: list[str] | None = None, max_tokens: int | None = None
    ) -> GenRequest:
        if body.model != state.model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                param="model",
                code="model_not_found",
            )
        try:
            ids = state.tokenizer.encode(prompt)
        except ValueError as e:
            raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
        room = state.max_context - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"prompt has {len(ids)} tokens; this model's context is {state.max_context}",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{state.max_context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        m.inc("prompt_tokens_total", "prompt tokens received", len(ids))
        return GenRequest(
            ids, max_tokens, body.temperature, body.top_p, body.stop_list() or (default_stop or []), body.seed
        )

    def submit(req: GenRequest) -> asyncio.Queue:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_event(ev: Event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                req.cancelled.set()

        req.on_event = on_event
        try:
            state.scheduler.submit(req)
        except (RuntimeError, OverflowError) as e:
            raise APIError(503, str(e), "server_error", code="overloaded") from None
        return queue

    async def collect(request: Request, req: GenRequest, queue: asyncio.Queue) -> Event:
        text = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                text.append(ev.text)
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                if ev.finish_reason:
                    ev.text = "".join(text)
                    return ev
        except BaseException:
            state.scheduler.cancel(req)
            raise

    def usage(ev: Event) -> dict:
        return {
            "prompt_tokens": ev.prompt_tokens,
            "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        }

    def stream(endpoint: str, req: GenRequest, queue: asyncio.Queue, chunk, include_usage: bool, started: float):
        async def gen():
            done = False
            try:
                first = chunk(None, None)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while not done:
                    ev = await queue.get()
                    if ev.error:
                        yield f"data: {json.dumps(error_body(ev.error, 'server_error'))}\n\n"
                        break
                    done = ev.finish_reason is not None
                    if ev.text or done:
                        yield f"data: {json.dumps(chunk(ev.text, ev.finish_reason))}\n\n"
                    if done and include_usage:
                        yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage(ev)})}\n\n"
                yield "data: [DONE]\n\n"
                count(endpoint, 200, started)
            finally:
                if not done:  # client went away (or shutdown): free the slot now
                    state.scheduler.cancel(req)

        return StreamingResponse(
            gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        started = time.perf_counter()
        max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else None
        req = make_request(body, body.prompt, max_tokens=max_tokens)
        if max_tokens is None:
            req.max_tokens = min(16, req.max_tokens)
        queue = submit(req)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
        if body.stream:

            def chunk(text, finish):
                if text is None:
                    return None
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream("/v1/completions", req, queue, chunk, include, started)
        ev = await collect(request, req, queue)
        count("/v1/completions", 200, started)
        return {
            **base,
            "choices": [{"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}],
            "usage": usage(ev),
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        started = time.perf_counter()
        req = make_request(
            body,
            chat_prompt(body.messages),
            default_stop=["\n\n"],
            max_tokens=body.max_completion_tokens or body.max_tokens,
        )
        queue = submit(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": state.model_name, "system_fingerprint": None}
        if body.stream:

            def chunk(text, finish):
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                }

            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream("/v1/chat/completions", req, queue, chunk, include, started)
        ev = await collect(request, req, queue)
        count("/v1/chat/completions", 200, started)
        message = {"role": "assistant", "content": ev.text}
        return {
            **base,
            "object": "chat.completion",
            "usage": usage(ev),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": ev.finish_reason}],
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llm-roadmap",
                    "max_model_len": state.max_context,
                }
            ],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "backend": state.backend, **state.scheduler.stats()}

    @app.get("/metrics")
    async def metrics():
        stats = state.scheduler.stats()
        m.set("free_slots", "free KV-cache slots", stats["free_slots"])
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    return app
