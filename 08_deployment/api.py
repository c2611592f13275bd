"""The FastAPI app: OpenAI-shaped routes, SSE streaming, errors, auth and metrics around the scheduler.

``create_app(state)`` is used by server.py (CLI) and by the tests (uvicorn in a thread on a free port). Every route
handler below is a plain module-level function that finds the server state at ``request.app.state.llm``:

    completions / chat_completions   validate -> GenRequest -> scheduler -> JSON body or SSE stream
    models / health / metrics         read-only views
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ch01.chat_template import render_chat
from ch08.scheduler import Event, GenRequest
from ch08.schemas import ChatRequest, CompletionRequest, chat_prompt, error_body

Chunk = Callable[[str | None, str | None], dict | None]  # (text or None for the opening chunk, finish) -> SSE payload


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


def _state(request: Request):
    return request.app.state.llm


# ------------------------------------------------------------------------------------------------- metrics, errors
def count(state, endpoint: str, status: int, started: float | None = None) -> None:
    m = state.metrics
    m.inc("requests_total", "HTTP requests by endpoint and status", endpoint=endpoint, status=str(status))
    if started is not None:
        latency = time.perf_counter() - started
        m.observe("request_latency_seconds", "request latency (to the last byte)", latency, endpoint=endpoint)


def error_response(request: Request, status: int, body: dict) -> JSONResponse:
    count(_state(request), request.url.path, status)
    return JSONResponse(body, status_code=status)


async def on_api_error(request: Request, exc: APIError):
    return error_response(request, exc.status, exc.body)


async def on_validation_error(request: Request, exc: RequestValidationError):
    err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    if err.get("type") == "json_invalid":
        return error_response(request, 400, error_body("request body is not valid JSON", code="invalid_json"))
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = f"{param}: {err['msg']}" if param else err["msg"]
    return error_response(request, 400, error_body(msg, param=param))


async def on_http_error(request: Request, exc: StarletteHTTPException):
    return error_response(request, exc.status_code, error_body(str(exc.detail), code=str(exc.status_code)))


async def on_internal_error(request: Request, exc: Exception):
    return error_response(request, 500, error_body(f"internal error: {exc}", "server_error"))


async def authorize(request: Request) -> None:
    key = _state(request).api_key
    if key and request.headers.get("authorization", "") != f"Bearer {key}":
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


# ------------------------------------------------------------------------------------------- request -> scheduler
def check_model(state, name: str) -> None:
    if name != state.model_name:
        raise APIError(
            404,
            f"model {name!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def encode_prompt(state, prompt: str) -> list[int]:
    try:
        ids = state.tokenizer.encode(prompt)
    except ValueError as e:
        raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
    if len(ids) >= state.max_context:
        raise APIError(
            400,
            f"prompt has {len(ids)} tokens; this model's context is {state.max_context}",
            param="prompt",
            code="context_length_exceeded",
        )
    return ids


def token_budget(state, n_prompt: int, max_tokens: int | None) -> int:
    """``max_tokens`` checked against the room the prompt leaves; None = all of that room."""
    room = state.max_context - n_prompt
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(
            400,
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of {state.max_context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def make_request(state, body, prompt: str, default_stop: list[str] | None = None, max_tokens: int | None = None):
    check_model(state, body.model)
    ids = encode_prompt(state, prompt)
    budget = token_budget(state, len(ids), max_tokens)
    state.metrics.inc("prompt_tokens_total", "prompt tokens received", len(ids))
    stop = body.stop_list() or (default_stop or [])
    return GenRequest(ids, budget, body.temperature, body.top_p, stop, body.seed)


def submit(state, req: GenRequest) -> asyncio.Queue:
    """Queue the request; its events arrive (from the scheduler thread) on the returned asyncio queue."""
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


# ----------------------------------------------------------------------------------------------- responses
async def next_event(request: Request, queue: asyncio.Queue) -> Event:
    """The next event, checking every 0.5 s whether the client went away (then CancelledError)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError from None


async def collect(request: Request, req: GenRequest, queue: asyncio.Queue) -> Event:
    """Wait for the whole completion: the final event with all text joined."""
    text = []
    try:
        while True:
            ev = await next_event(request, queue)
            text.append(ev.text)
            if ev.error:
                raise APIError(500, ev.error, "server_error")
            if ev.finish_reason:
                ev.text = "".join(text)
                return ev
    except BaseException:
        _state(request).scheduler.cancel(req)
        raise


def usage(ev: Event) -> dict:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def sse_events(queue: asyncio.Queue, chunk: Chunk, include_usage: bool):
    """SSE lines until the request finishes (or fails); the caller adds ``[DONE]``."""
    first = chunk(None, None)
    if first is not None:
        yield sse(first)
    while True:
        ev = await queue.get()
        if ev.error:
            yield sse(error_body(ev.error, "server_error"))
            return
        done = ev.finish_reason is not None
        if ev.text or done:
            yield sse(chunk(ev.text, ev.finish_reason))
        if done:
            if include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage(ev)})
            return


def stream(state, endpoint: str, req: GenRequest, queue: asyncio.Queue, chunk: Chunk, include_usage: bool, started):
    async def gen():
        finished = False
        try:
            async for line in sse_events(queue, chunk, include_usage):
                yield line
            yield "data: [DONE]\n\n"
            finished = True
            count(state, endpoint, 200, started)
        finally:
            if not finished:  # client went away (or shutdown): free the slot now
                state.scheduler.cancel(req)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)


def completion_chunk(base: dict, text: str | None, finish: str | None) -> dict | None:
    if text is None:  # completions streams have no opening chunk
        return None
    return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(base: dict, text: str | None, finish: str | None) -> dict:
    delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}


def wants_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


# ----------------------------------------------------------------------------------------------------- routes
async def completions(body: CompletionRequest, request: Request):
    state, started, endpoint = _state(request), time.perf_counter(), "/v1/completions"
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else None
    req = make_request(state, body, body.prompt, max_tokens=max_tokens)
    if max_tokens is None:
        req.max_tokens = min(16, req.max_tokens)  # OpenAI's default, within the context
    queue = submit(state, req)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if body.stream:
        return stream(state, endpoint, req, queue, partial(completion_chunk, base), wants_usage(body), started)
    ev = await collect(request, req, queue)
    count(state, endpoint, 200, started)
    choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
    return {**base, "choices": [choice], "usage": usage(ev)}


async def chat_completions(body: ChatRequest, request: Request):
    state, started, endpoint = _state(request), time.perf_counter(), "/v1/chat/completions"
    max_tokens = body.max_completion_tokens or body.max_tokens
    template = getattr(state.tokenizer, "chat_template", None)
    if template:  # a real instruct model: its own template; it ends its turn with its end-of-turn token
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt, default_stop = render_chat(template, messages, add_generation_prompt=True), None
        except TemplateError as e:  # the template itself refused the conversation (e.g. roles out of order)
            raise APIError(400, f"messages do not fit the model's chat template: {e}", param="messages") from None
    else:  # the course's char model: a play-script turn, ended by a blank line
        prompt, default_stop = chat_prompt(body.messages), ["\n\n"]
    req = make_request(state, body, prompt, default_stop=default_stop, max_tokens=max_tokens)
    queue = submit(state, req)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": state.model_name,
        "system_fingerprint": None,
    }
    if body.stream:
        return stream(state, endpoint, req, queue, partial(chat_chunk, base), wants_usage(body), started)
    ev = await collect(request, req, queue)
    count(state, endpoint, 200, started)
    message = {"role": "assistant", "content": ev.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": ev.finish_reason}
    return {**base, "object": "chat.completion", "usage": usage(ev), "choices": [choice]}


async def models(request: Request):
    state = _state(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "llm-roadmap",
        "max_model_len": state.max_context,
    }
    return {"object": "list", "data": [card]}


async def health(request: Request):
    state = _state(request)
    return {"status": "ok", "model": state.model_name, "backend": state.backend, **state.scheduler.stats()}


async def metrics(request: Request):
    state = _state(request)
    state.metrics.set("free_slots", "free KV-cache slots", state.scheduler.stats()["free_slots"])
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


# --------------------------------------------------------------------------------------------------------- app
@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    state = app.state.llm
    await asyncio.to_thread(state.scheduler.shutdown, state.shutdown_timeout)


def create_app(state) -> FastAPI:
    app = FastAPI(title="mini-GPT OpenAI-compatible server", lifespan=lifespan)
    app.state.llm = state
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_internal_error)
    auth = [Depends(authorize)]
    app.post("/v1/completions", dependencies=auth)(completions)
    app.post("/v1/chat/completions", dependencies=auth)(chat_completions)
    app.get("/v1/models", dependencies=auth)(models)
    app.get("/health")(health)
    app.get("/metrics")(metrics)
    return app
