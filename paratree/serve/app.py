"""FastAPI app: OpenAI-compatible chat/completions (SSE streaming), models, health, Prometheus metrics.

Every error is an OpenAI-style {"error": {...}} with a 4xx/5xx status; the engine
runs in its own thread, so a bad request never takes the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.scheduler import EngineRequest, Event, QueueFullError, RequestResult
from ..verify.warp import SamplingParams
from .backend import ServeEngine
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_body, validation_error

MAX_BODY_BYTES = 1 << 20
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _json_error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class GuardMiddleware:
    """Bearer auth (before anything else is looked at), body-size limit, response-code counting."""

    def __init__(self, app, api_key: str | None, max_body: int, counter: Counter):
        self.app, self.api_key, self.max_body, self.counter = app, api_key, max_body, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else "other"
        status_box = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_box["code"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if self.api_key is not None:
                auth = headers.get("authorization", "")
                token = auth[7:] if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode("utf-8")):
                    resp = _json_error(401, error_body("Invalid or missing API key.", "invalid_request_error", None,
                                                       "invalid_api_key"), {"WWW-Authenticate": "Bearer"})
                    return await resp(scope, receive, counting_send)
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                cl = headers.get("content-length")
                too_big = error_body(f"Request body larger than {self.max_body} bytes.", "invalid_request_error",
                                     None, "request_too_large")
                if cl is not None and (not cl.isdigit() or int(cl) > self.max_body):
                    return await _json_error(413, too_big)(scope, receive, counting_send)
                chunks, size = [], 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        return await _json_error(413, too_big)(scope, receive, counting_send)
                    chunks.append(chunk)
                    if not msg.get("more_body", False):
                        break
                body = b"".join(chunks)
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()  # afterwards: http.disconnect when the client goes away

                return await self.app(scope, replay, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            self.counter[(label, str(status_box["code"]))] += 1


def create_app(engine: ServeEngine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="paratree", docs_url=None, redoc_url=None, openapi_url=None)
    http_counts: Counter = Counter()
    app.add_middleware(GuardMiddleware, api_key=api_key or None, max_body=max_body_bytes, counter=http_counts)
    app.state.engine = engine
    sched = engine.scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _json_error(exc.status, exc.body(), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json_error(exc.status_code, error_body(str(exc.detail), kind, None, None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _json_error(400, error_body("invalid request", "invalid_request_error", None, "invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _json_error(500, error_body("internal server error", "server_error", None, None))

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        if not raw:
            raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "The request body is not valid UTF-8.", code="invalid_encoding") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return data

    def check_model(name: str) -> None:
        if name != engine.model_name:
            raise ApiError(404, f"The model '{name[:200]}' does not exist; this server serves '{engine.model_name}'.",
                           param="model", code="model_not_found")

    def sampling(req) -> SamplingParams:
        sp = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
        )
        try:
            return sp.validate()
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def check_prompt(ids: list[int], max_tokens: int | None, default_cap: int | None, param: str) -> int:
        n = len(ids)
        if n == 0:
            raise ApiError(400, "The prompt is empty.", param=param, code="empty_prompt")
        room = engine.max_model_len - n
        if room < 1:
            raise ApiError(400, f"The prompt has {n} tokens; this model's context window is "
                                f"{engine.max_model_len} tokens.", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return room if default_cap is None else min(room, default_cap)
        if max_tokens > room:
            raise ApiError(400, f"max_tokens={max_tokens} plus the {n}-token prompt exceeds the context window of "
                                f"{engine.max_model_len} tokens.", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def usage(res: RequestResult) -> dict:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                "total_tokens": res.prompt_tokens + len(res.token_ids)}

    def speculative(res: RequestResult) -> dict:
        return {"rounds": res.rounds, "tau": round(res.tau, 4),
                "accepted_draft_tokens": max(0, sum(res.accepted_per_round) - res.rounds),
                "mean_tree_size": round(sum(res.tree_sizes) / max(1, len(res.tree_sizes)), 3),
                "drafter": engine.drafter_name, "policy": engine.policy.mode}

    def finish_reason(res: RequestResult) -> str:
        return "stop" if res.finish_reason == "stop" else "length"

    def failure(res: RequestResult) -> ApiError | None:
        if res.finish_reason == "timeout":
            return ApiError(504, "The request timed out.", "timeout_error", None, "timeout")
        if res.finish_reason == "error":
            return ApiError(500, "The engine failed while generating.", "server_error")
        if res.finish_reason == "cancelled":
            return ApiError(503, "The request was cancelled.", "server_error", None, "cancelled")
        return None

    async def generate(request: Request, kind: str, body, prompt_ids: list[int], max_tokens: int):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        finished = asyncio.Event()

        def on_event(ev: Event) -> None:  # engine thread -> event loop
            try:
                if body.stream:
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
                if ev.kind == "done":
                    loop.call_soon_threadsafe(finished.set)
            except RuntimeError:  # loop closed (shutdown)
                pass

        ereq = EngineRequest(prompt_ids, max_tokens, sampling(body), stop=body.stop_list() or None,
                             timeout_s=min(engine.request_timeout, body.timeout or float("inf")), on_event=on_event)
        try:
            handle = sched.submit(ereq)
        except QueueFullError as e:
            raise ApiError(429, str(e), "rate_limit_error", None, "queue_full", {"Retry-After": "1"}) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        if not body.stream:
            try:
                while not finished.is_set():
                    try:  # cancelling Event.wait loses nothing (unlike Queue.get under wait_for)
                        await asyncio.wait_for(finished.wait(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            sched.cancel(handle)
                            return JSONResponse(error_body("client disconnected"), status_code=499)
            finally:
                if not handle.done:
                    sched.cancel(handle)
            res = handle.result
            if (err := failure(res)) is not None:
                raise err
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                          "finish_reason": finish_reason(res), "logprobs": None}
            else:
                choice = {"index": 0, "text": res.text, "finish_reason": finish_reason(res), "logprobs": None}
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": engine.model_name,
                                 "choices": [choice], "usage": usage(res), "speculative": speculative(res)})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": chunk_obj, "created": created, "model": engine.model_name,
                       "choices": [choice], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def sse():
            try:
                if kind == "chat":
                    yield chunk("", role=True)
                while True:
                    ev = await queue.get()
                    if ev.text:
                        yield chunk(ev.text)
                    if ev.kind != "done":
                        continue
                    res = ev.result
                    err = failure(res)
                    if err is not None:
                        yield f"data: {json.dumps(err.body())}\n\n"
                    else:
                        yield chunk(None if kind == "chat" else "", finish_reason(res), speculative=speculative(res))
                        if include_usage:
                            payload = {"id": rid, "object": chunk_obj, "created": created,
                                       "model": engine.model_name, "choices": [], "usage": usage(res)}
                            yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:  # client gone (task cancelled) or stream finished
                if not handle.done:
                    sched.cancel(handle)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def parse(model_cls, data):
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatCompletionRequest, await read_json(request))
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = await run_in_threadpool(engine.encode_chat, messages)
        except Exception as e:  # template errors (e.g. roles the template rejects)
            raise ApiError(400, f"cannot apply the chat template: {str(e)[:300]}", param="messages") from None
        max_tokens = check_prompt(ids, body.requested_max_tokens(), None, "messages")
        return await generate(request, "chat", body, ids, max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(CompletionRequest, await read_json(request))
        check_model(body.model)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            if any(not 0 <= t < engine.vocab_size for t in p):
                raise ApiError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
            ids = list(p)
        else:
            text = p if isinstance(p, str) else p[0]
            ids = await run_in_threadpool(engine.encode_text, text)
        max_tokens = check_prompt(ids, body.requested_max_tokens(), 16, "prompt")
        return await generate(request, "completion", body, ids, max_tokens)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": engine.created,
                                            "owned_by": "paratree", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if not sched.alive:
            return _json_error(503, error_body("engine not running", "server_error"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine, http_counts), media_type="text/plain; version=0.0.4")

    return app


def render_metrics(engine: ServeEngine, http_counts: Counter) -> str:
    s = engine.scheduler
    m = s.metrics
    pol = engine.policy
    tps, tau_recent = m.recent()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    metric("paratree_http_requests_total", "counter", "HTTP responses by path and status code.",
           [({"path": p, "code": c}, n) for (p, c), n in sorted(http_counts.items())])
    metric("paratree_requests_finished_total", "counter", "Engine requests finished, by reason.",
           [({"reason": r}, n) for r, n in sorted(m.finished.items())])
    metric("paratree_requests_running", "gauge", "Sequences holding a KV row.", [({}, s.num_running)])
    metric("paratree_queue_depth", "gauge", "Requests waiting for a KV row.", [({}, s.queue_depth)])
    metric("paratree_max_batch", "gauge", "KV rows (max concurrent sequences).", [({}, s.max_batch)])
    metric("paratree_max_queue", "gauge", "Queue bound (429 beyond).", [({}, s.max_queue)])
    metric("paratree_batch_size", "gauge", "Sequences verified in the last round.", [({}, m.last_batch)])
    metric("paratree_batch_size_mean", "gauge", "Mean sequences per verify round.",
           [({}, round(m.seq_rounds / max(1, m.rounds), 4))])
    metric("paratree_tau", "gauge", "Tokens emitted per sequence per round, last 10 s.", [({}, round(tau_recent, 4))])
    metric("paratree_tau_mean", "gauge", "Tokens emitted per sequence per round since start.",
           [({}, round(m.generated_tokens / max(1, m.seq_rounds), 4))])
    metric("paratree_tokens_per_second", "gauge", "Generated tokens per second, last 10 s.", [({}, round(tps, 3))])
    metric("paratree_generated_tokens_total", "counter", "Generated tokens.", [({}, m.generated_tokens)])
    metric("paratree_prompt_tokens_total", "counter", "Prompt tokens admitted.", [({}, m.prompt_tokens)])
    metric("paratree_verify_rounds_total", "counter", "Batched verify forwards.", [({}, m.rounds)])
    metric("paratree_verify_tokens_total", "counter", "Tree nodes verified (all sequences).", [({}, m.verify_tokens)])
    metric("paratree_verify_tokens_last", "gauge", "Tree nodes in the last verify forward.",
           [({}, m.last_verify_tokens)])
    metric("paratree_draft_seconds_total", "counter", "Time drafting and sizing trees.", [({}, round(m.draft_s, 6))])
    metric("paratree_verify_seconds_total", "counter", "Time in verify forwards + acceptance + commit.",
           [({}, round(m.verify_s, 6))])
    metric("paratree_prefill_seconds_total", "counter", "Time prefilling prompts.", [({}, round(m.prefill_s, 6))])
    metric("paratree_policy_info", "gauge", "Serving policy and the mode of the last round.",
           [({"policy": pol.mode, "mode": m.last_mode, "drafter": engine.drafter_name}, 1)])
    metric("paratree_policy_rounds_total", "counter", "Verify rounds per policy mode.",
           [({"mode": k}, n) for k, n in sorted(m.mode_rounds.items())])
    metric("paratree_policy_switch_batch", "gauge",
           "Largest batch the verify cost curve puts in latency mode (the rate gates' prior).", [({}, pol.switch_batch)])
    metric("paratree_policy_flat_tokens", "gauge", "Verify tokens within the flat part of the cost curve.",
           [({}, pol.flat_tokens)])
    return "\n".join(lines) + "\n"
