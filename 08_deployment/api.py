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
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ch01.chat_template import render_chat
from ch07.constrained import JSONLogitsProcessor, guide_for
from ch08.scheduler import Event, GenRequest
from ch08.schemas import ChatRequest, CompletionRequest, chat_prompt, error_body

Chunk = Callable[..., dict | None]  # (choice, text or None for the opening chunk, finish, logprob entries) -> payload


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
    if err.get("type") == "extra_forbidden":  # a parameter we do not implement: say so rather than ignore it
        msg = f"{param}: this parameter is not supported by this server"
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


def encode_prompt(state, prompt: str | list[int]) -> list[int]:
    """A prompt string tokenized, or a list of token ids checked against the vocabulary; and against the context."""
    if isinstance(prompt, str):
        try:
            ids = state.tokenizer.encode(prompt)
        except ValueError as e:
            raise APIError(400, f"prompt cannot be tokenized: {e}", param="prompt") from None
    else:
        ids, vocab = list(prompt), state.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside this model's vocabulary (0..{vocab - 1})", param="prompt")
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


def make_requests(
    state,
    body,
    prompts: list[str] | list[list[int]],
    default_stop: list[str] | None = None,
    max_tokens: int | None = None,
    n_logprobs: int | None = None,
) -> list[GenRequest]:
    """One GenRequest per prompt, each carrying its ``n - 1`` forks; choice ``p·n + j`` is prompt p's j-th (OpenAI's
    order). All checks happen before anything is queued."""
    check_model(state, body.model)
    max_n = state.scheduler.engine.max_slots
    if body.n > max_n:
        raise APIError(400, f"n={body.n} is more than this server's batch of {max_n} sequences", param="n")
    stop = body.stop_list() or (default_stop or [])
    reqs = []
    for prompt in prompts:
        ids = encode_prompt(state, prompt)
        budget = token_budget(state, len(ids), max_tokens)
        kw = dict(stop=stop, seed=body.seed, n_logprobs=n_logprobs)
        forks = [GenRequest(ids, budget, body.temperature, body.top_p, **kw) for _ in range(body.n - 1)]
        reqs.append(GenRequest(ids, budget, body.temperature, body.top_p, forks=forks, **kw))
    for r in reqs:
        state.metrics.inc("prompt_tokens_total", "prompt tokens received", len(r.prompt_ids))
    return reqs


def choices(reqs: list[GenRequest]) -> list[GenRequest]:
    """Every choice in OpenAI's order: prompt by prompt, its n samples."""
    return [c for r in reqs for c in (r, *r.forks)]


async def constrain(state, body, reqs: list[GenRequest]) -> None:
    """``response_format``: every choice gets its own JSON token mask (ch07/constrained.py); a bad format -> 400. The
    guide (trie walk, mask cache) is built off the event loop: the first request for a vocabulary takes ~1 s."""
    if body.response_format is None:
        return
    tok, eos = state.tokenizer, state.scheduler.eos_id
    try:
        guide = await asyncio.to_thread(guide_for, tok, body.response_format, eos)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None
    for c in choices(reqs) if guide is not None else []:
        c.logits_processor = JSONLogitsProcessor(guide)


def submit(state, reqs: list[GenRequest]) -> asyncio.Queue:
    """Queue the requests; their events arrive (from the scheduler thread) on the returned asyncio queue as
    (choice index, Event)."""
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_event(index: int, req: GenRequest, ev: Event):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            req.cancelled.set()

    for i, c in enumerate(choices(reqs)):
        c.on_event = partial(on_event, i, c)
    try:
        for r in reqs:
            state.scheduler.submit(r)
    except (RuntimeError, OverflowError) as e:
        cancel(state, reqs)
        raise APIError(503, str(e), "server_error", code="overloaded") from None
    return queue


def cancel(state, reqs: list[GenRequest]) -> None:
    for r in reqs:
        state.scheduler.cancel(r)


# ----------------------------------------------------------------------------------------------- responses
async def next_event(request: Request, queue: asyncio.Queue) -> tuple[int, Event]:
    """The next (choice, event), checking every 0.5 s whether the client went away (then CancelledError)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError from None


async def collect(request: Request, reqs: list[GenRequest], queue: asyncio.Queue) -> list[Event]:
    """Wait for every choice to finish: one final event per choice with its text and logprob entries joined."""
    n = len(choices(reqs))
    text, logprobs, final = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
    try:
        while any(f is None for f in final):
            i, ev = await next_event(request, queue)
            if ev.error:
                raise APIError(500, ev.error, "server_error")
            text[i].append(ev.text)
            logprobs[i] += ev.logprobs or []
            if ev.finish_reason:
                ev.text, ev.logprobs, final[i] = "".join(text[i]), logprobs[i], ev
        return final
    except BaseException:
        cancel(_state(request), reqs)
        raise


def usage(events: list[Event], reqs: list[GenRequest]) -> dict:
    """Token counts: each prompt once (its n choices share it), every choice's completion."""
    prompt = sum(len(r.prompt_ids) for r in reqs)
    completion = sum(ev.completion_tokens for ev in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def sse_events(queue: asyncio.Queue, reqs: list[GenRequest], chunk: Chunk, include_usage: bool):
    """SSE lines until every choice finishes (or one fails); the caller adds ``[DONE]``."""
    n = len(choices(reqs))
    for i in range(n):
        first = chunk(i, None, None, None)
        if first is not None:
            yield sse(first)
    final: list[Event | None] = [None] * n
    while any(f is None for f in final):
        i, ev = await queue.get()
        if ev.error:
            yield sse(error_body(ev.error, "server_error"))
            return
        done = ev.finish_reason is not None
        if ev.text or ev.logprobs or done:
            yield sse(chunk(i, ev.text, ev.finish_reason, ev.logprobs))
        if done:
            final[i] = ev
    if include_usage:
        yield sse({**chunk(0, "", None, None), "choices": [], "usage": usage(final, reqs)})


def stream(state, endpoint: str, reqs: list[GenRequest], queue, chunk: Chunk, include_usage: bool, started):
    async def gen():
        finished = False
        try:
            async for line in sse_events(queue, reqs, chunk, include_usage):
                yield line
            yield "data: [DONE]\n\n"
            finished = True
            count(state, endpoint, 200, started)
        finally:
            if not finished:  # client went away (or shutdown, or a choice failed): free the slots now
                cancel(state, reqs)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id])


def completion_logprobs(tok, entries: list[dict] | None) -> dict | None:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    if entries is None:
        return None
    return {
        "tokens": [token_text(tok, e["id"]) for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{token_text(tok, t): lp for t, lp in e["top"]} for e in entries],
        "text_offset": [e["offset"] for e in entries],
    }


def chat_logprobs(tok, entries: list[dict] | None) -> dict | None:
    """The chat ``logprobs`` object: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e["id"], e["logprob"]), "top_logprobs": [item(*t) for t in e["top"]]} for e in entries]}


def completion_chunk(tok, base: dict, index: int, text: str | None, finish: str | None, lp) -> dict | None:
    if text is None:  # completions streams have no opening chunk
        return None
    choice = {"index": index, "text": text, "logprobs": completion_logprobs(tok, lp), "finish_reason": finish}
    return {**base, "choices": [choice]}


def chat_chunk(tok, base: dict, index: int, text: str | None, finish: str | None, lp) -> dict:
    delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(tok, lp), "finish_reason": finish}
    return {**base, "object": "chat.completion.chunk", "choices": [choice]}


def wants_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


# ----------------------------------------------------------------------------------------------------- routes
async def completions(body: CompletionRequest, request: Request):
    state, started, endpoint = _state(request), time.perf_counter(), "/v1/completions"
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else None
    reqs = make_requests(state, body, body.prompt_list(), max_tokens=max_tokens, n_logprobs=body.logprobs)
    if max_tokens is None:
        for c in choices(reqs):
            c.max_tokens = min(16, c.max_tokens)  # OpenAI's default, within the context
    await constrain(state, body, reqs)
    queue = submit(state, reqs)
    base = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    if body.stream:
        chunk = partial(completion_chunk, state.tokenizer, base)
        return stream(state, endpoint, reqs, queue, chunk, wants_usage(body), started)
    events = await collect(request, reqs, queue)
    count(state, endpoint, 200, started)
    out = [
        {
            "index": i,
            "text": ev.text,
            "logprobs": completion_logprobs(state.tokenizer, ev.logprobs if body.logprobs is not None else None),
            "finish_reason": ev.finish_reason,
        }
        for i, ev in enumerate(events)
    ]
    return {**base, "choices": out, "usage": usage(events, reqs)}


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
    if body.response_format is not None and body.response_format.get("type") != "text":
        default_stop = None  # JSON may hold blank lines; the value's end (or EOS) ends the turn
    n_lp = body.n_logprobs()
    reqs = make_requests(state, body, [prompt], default_stop=default_stop, max_tokens=max_tokens, n_logprobs=n_lp)
    await constrain(state, body, reqs)
    queue = submit(state, reqs)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": state.model_name,
        "system_fingerprint": None,
    }
    if body.stream:
        chunk = partial(chat_chunk, state.tokenizer, base)
        return stream(state, endpoint, reqs, queue, chunk, wants_usage(body), started)
    events = await collect(request, reqs, queue)
    count(state, endpoint, 200, started)
    out = [
        {
            "index": i,
            "message": {"role": "assistant", "content": ev.text},
            "logprobs": chat_logprobs(state.tokenizer, ev.logprobs if n_lp is not None else None),
            "finish_reason": ev.finish_reason,
        }
        for i, ev in enumerate(events)
    ]
    return {**base, "object": "chat.completion", "usage": usage(events, reqs), "choices": out}


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


KV_GAUGES = {
    "blocks_used": "KV-cache blocks referenced by running sequences",
    "blocks_cached": "KV-cache blocks holding a cached prefix nobody uses now (evictable)",
    "blocks_free": "KV-cache blocks an allocation can take (never used + evictable cached)",
}


async def metrics(request: Request):
    state = _state(request)
    stats = state.scheduler.stats()
    state.metrics.set("free_slots", "free KV-cache slots", stats["free_slots"])
    for name, help_text in KV_GAUGES.items():
        if name in stats:  # the paged engine (ch07's block pool)
            state.metrics.set(f"kv_{name}", help_text, stats[name])
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


CHAT_PAGE = Path(__file__).with_name("chat.html")


async def chat_page():
    """The browser chat page (08_deployment/chat.html): plain JS over /v1/chat/completions with streaming."""
    return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))


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
    app.get("/", include_in_schema=False)(chat_page)
    app.get("/metrics")(metrics)
    return app
