"""OpenAI-compatible HTTP server over one `Runtime`: /v1/completions, /v1/chat/completions (both with
`stream`), /v1/models. Extra per-request fields: `budget` (fraction of the full cost), `speculative`, and the
draft settings `draft_exit`, `draft_tokens`, `draft_threshold`, `adaptive_draft` (with `speculative`).
OpenAI fields that would change the answer and are not implemented (`n` > 1, `logprobs`, `tools`,
`response_format`, ...: `UNSUPPORTED`) get a 400 naming the field.

Needs the optional extra: `pip install manyinone[serve]` (FastAPI + uvicorn). Requests are checked
before any work starts (a bad budget, an over-long prompt or a wrongly typed field is a 400 naming the
value; more prompts or KV-cache memory than the limits allow is a 413). With `batch_rows`, plain
(non-speculative) requests at any budgets share one continuously batched decode (`runtime.batching`):
they join and leave between steps and each gets what it would get alone (greedy). Everything else
runs one request at a time on a worker thread, so concurrent requests queue instead of clashing,
and a stream whose client disconnects stops generating. With `api_key`, every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

try:  # module level: FastAPI resolves the endpoints' (string) annotations in this module's namespace
    from starlette.requests import Request
except ImportError:  # without the [serve] extra, create_app says what to install
    Request = Any

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.batching import Batcher, BatchRequest
from manyinone.runtime.generate import DEFAULT_MAX_CACHE_MIB, OverLimit, Runtime, dtype_named
from manyinone.runtime.openai_fields import UNSUPPORTED, Unsupported  # noqa: F401  (re-exported)
from manyinone.runtime.sampling import Sampling
from manyinone.runtime.draft_policy import plan_for

AUTO_BATCH_ROWS = 16  # rows of the shared batch when the cache limit allows (serve's batch_rows="auto")


def _unicode(value: Any) -> Any:
    """Text (or a list of texts) that is valid Unicode: JSON's "\\ud800" decodes to a lone surrogate,
    which no tokenizer can encode."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text holds a lone surrogate ({text[exc.start]!r}) at character {exc.start}; "
                             "send valid Unicode") from None
    return value


class _Common(BaseModel):
    # OpenAI clients send fields we have no use for (user, ...); the ones we read are strictly typed
    # (`max_tokens: true` or `stream: "yes"` are refused, not coerced) and finite. Extras are kept so
    # `refuse_unsupported` can name a field that would change the answer.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    stream: StrictBool = False
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generator takes
    budget: Optional[StrictFloat] = None
    speculative: StrictBool = False
    # Draft settings (speculative only); ranges are checked by the draft policy, whose errors name them.
    draft_exit: Optional[StrictInt] = None
    draft_tokens: Optional[StrictInt] = None
    draft_threshold: Optional[StrictFloat] = None
    adaptive_draft: Optional[StrictBool] = None

    def draft(self) -> dict[str, Any]:
        return {"draft_depth": self.draft_exit, "draft_tokens": self.draft_tokens,
                "draft_threshold": self.draft_threshold, "adaptive_draft": self.adaptive_draft}

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings (an empty one would end every completion at once)")
        return _unicode(value)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refuse_unsupported(self) -> None:
        """Raise `Unsupported` for the first field of UNSUPPORTED set to something other than off."""
        for field, value in (self.model_extra or {}).items():
            if field in UNSUPPORTED and not UNSUPPORTED[field][0](value):
                raise Unsupported(field, value, UNSUPPORTED[field][1])


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr]]

    _prompt_unicode = field_validator("prompt")(classmethod(lambda cls, v: _unicode(v)))


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr

    _content_unicode = field_validator("content")(classmethod(lambda cls, v: _unicode(v)))


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)


class _Unauthorized(Exception):
    pass


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param, "code": code}})


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def batched_steps(req: BatchRequest):
    """A batched request's tokens as `Runtime.stream` yields them ([[new tokens]] per step); closing the
    generator early (a stop string, a client that left) takes the row out of the batch."""
    try:
        while True:
            kind, *rest = req.events.get()
            if kind == "tokens":
                yield [rest[0]]
            elif kind == "error":
                raise ManyinoneError(rest[0])
            else:
                return
    finally:
        req.cancel.set()


class Engine:
    """Turns checked requests into generation: batched rows (with a `Batcher`), else one worker thread at a time."""

    def __init__(self, runtime: Runtime, template: str, default_max_tokens: int = 256,
                 batch_rows: int | None = None, draft: dict[str, Any] | None = None) -> None:
        """`draft`: the server's default draft settings (`Runtime.generate` names) for speculative requests
        that leave them out."""
        self.runtime, self.template, self.default_max_tokens = runtime, template, default_max_tokens
        self.draft = {k: v for k, v in (draft or {}).items() if v is not None}
        self.lock = threading.Lock()
        self.cancelled = 0  # streams stopped because their client went away
        self.batcher = None
        if batch_rows is not None:
            self.batcher = Batcher(runtime, batch_rows, lock=self.lock)  # steps under the same lock as serial work
            self.batcher.start()

    def batched(self, job: dict[str, Any]) -> bool:
        # A token-routed budget changes its plan every step; it decodes through Runtime.stream, not the batch.
        return self.batcher is not None and not job["speculative"] and self.runtime.token_routing(job["budget"]) is None

    def submit_rows(self, job: dict[str, Any]) -> list[BatchRequest]:
        return [self.batcher.submit(p, job["budget"], job["max_new_tokens"], job["sampling"]) for p in job["prompts"]]

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of a chat in the template the checkpoint was trained with, encoded as training
        encoded prompts (one BOS, never two): a chat-trained checkpoint gets the tokenizer's chat
        template over the whole conversation; an Alpaca-trained one the Alpaca prompt around the last
        user message (Alpaca is single-turn), even when its tokenizer has a chat template."""
        from manyinone.train.data import encode_prompt

        tok = self.runtime.tokenizer
        if self.template == "chat" and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                           add_generation_prompt=True)
            return self.runtime.encode(text, "chat")
        user = [m.content for m in messages if m.role == "user"] or [messages[-1].content]
        template = "alpaca" if self.template == "chat" else self.template  # chat-trained, template since lost
        return encode_prompt({"instruction": user[-1], "input": "", "output": ""}, tok, template)

    def check(self, req: _Common, prompts: list[str | list[int]], max_tokens: int | None) -> dict[str, Any]:
        """Everything a bad request could get wrong, before any work: raises ManyinoneError."""
        rt = self.runtime
        depth, plan = rt.target(req.budget)
        extra, draft = 0, {}
        asked = {k: v for k, v in req.draft().items() if v is not None}
        if asked and not req.speculative:
            named = [f for f in ("draft_exit", "draft_tokens", "draft_threshold", "adaptive_draft")
                     if getattr(req, f) is not None]
            raise ManyinoneError(f"{', '.join(named)}: draft settings need \"speculative\": true")
        if req.speculative and plan is not None:
            raise ManyinoneError(f"budget {req.budget} runs a per-layer (width, heads) plan; speculative decoding serves depth "
                                 "budgets only: set speculative false")
        if req.speculative:
            draft = {**self.draft, **asked}
            draft_plan = plan_for(rt, depth, draft.get("draft_depth"), draft.get("draft_tokens"),
                                  draft.get("draft_threshold"), draft.get("adaptive_draft"))
            extra = draft_plan.max_tokens  # the draft may run k slots past the answer
        ids = [p if isinstance(p, list) else rt.encode(p) for p in prompts]  # text or already-encoded ids
        if req.stream and len(ids) > 1:
            raise ManyinoneError("stream supports one prompt per request; got a list of prompts")
        max_new = max_tokens or self.default_max_tokens
        rt.check_request(ids, max_new, extra)
        # Without a seed each request samples afresh (as OpenAI's API does); with one it replays exactly.
        sampling = Sampling(req.temperature, req.top_p, req.seed if req.seed is not None else secrets.randbits(31))
        return {"prompts": ids, "budget": req.budget, "max_new_tokens": max_new, "sampling": sampling,
                "speculative": req.speculative, "draft": draft, "stops": req.stops(), "depth": depth}

    def complete(self, job: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
        """Non-streaming: texts, finish reasons, and the generation's info (blocking; takes the lock, or
        waits for its rows of the shared batch)."""
        if self.batched(job):
            rows = []
            for req in self.submit_rows(job):
                tokens = [t for step in batched_steps(req) for t in step[0]]
                rows.append((tokens, "stop" if len(tokens) < job["max_new_tokens"] else "length"))
            info = {"depth": job["depth"], "batched": True}
        else:
            with self.lock:
                out = self.runtime.generate(job["prompts"], job["budget"], job["max_new_tokens"], job["sampling"],
                                            speculative=job["speculative"], **job["draft"])
            rows, info = list(zip(out.tokens, out.finish)), {"depth": out.depth, **out.stats}
        texts, finish = [], []
        for tokens, reason in rows:
            text, stopped = cut_at_stop(self.runtime.decode(tokens), job["stops"])
            texts.append(text)
            finish.append("stop" if stopped else reason)
        return texts, finish, {**info, "completion_tokens": sum(len(t) for t, _ in rows)}

    def start_stream(self, job: dict[str, Any]) -> tuple["queue.Queue[tuple]", threading.Event]:
        """Streaming: a worker thread puts ("delta", text) items, then ("done", finish, tokens) or ("error", msg).
        Setting the returned event (the client went away) stops it after the current token."""
        events: queue.Queue[tuple] = queue.Queue()
        cancel = threading.Event()
        threading.Thread(target=self._stream_worker, args=(job, events, cancel), daemon=True).start()
        return events, cancel

    def _stream_worker(self, job: dict[str, Any], events: "queue.Queue[tuple]", cancel: threading.Event) -> None:
        rt = self.runtime
        try:
            # A batched stream holds no lock: the batcher steps under it, between serial requests.
            with contextlib.nullcontext() if self.batched(job) else self.lock:
                if cancel.is_set():  # the client left while this request waited for its turn
                    self.cancelled += 1
                    return
                if self.batched(job):
                    steps = batched_steps(self.submit_rows(job)[0])
                elif job["speculative"]:
                    from manyinone.runtime.speculative import speculative_stream

                    d = job["draft"]
                    steps = speculative_stream(rt, job["prompts"][0], job["budget"], job["max_new_tokens"],
                                               job["sampling"], None, d.get("draft_depth"), d.get("draft_tokens"),
                                               threshold=d.get("draft_threshold"), adaptive=d.get("adaptive_draft"))
                else:
                    steps = rt.stream(job["prompts"], job["budget"], job["max_new_tokens"], job["sampling"])
                tokens, sent, finish = [], "", "length"
                for step in steps:
                    if cancel.is_set():
                        steps.close()
                        self.cancelled += 1
                        return
                    tokens.extend(step[0])
                    text, stopped = cut_at_stop(rt.decode(tokens), job["stops"])
                    if text.endswith("\ufffd") and not stopped:  # half a multi-byte character: wait for the rest
                        continue
                    if len(text) > len(sent):
                        events.put(("delta", text[len(sent):]))
                        sent = text
                    if stopped:
                        finish = "stop"
                        steps.close()
                        break
                else:
                    finish = "stop" if len(tokens) < job["max_new_tokens"] else "length"
            events.put(("done", finish, len(tokens)))
        except Exception as exc:  # reported in the stream; the server itself stays up
            events.put(("error", f"{type(exc).__name__}: {exc}"))


def create_app(runtime: Runtime, model_name: str, template: str = "alpaca", default_max_tokens: int = 256,
               api_key: str | None = None, batch_rows: int | None = None, draft: dict[str, Any] | None = None):
    """The FastAPI app serving `runtime` under the name `model_name`; with `api_key`, requests need it as a
    bearer token (401 otherwise). Limits on rows and cache memory are the runtime's (`Runtime(max_batch=...)`).
    batch_rows: rows of the shared continuous batch (None: one request at a time)."""
    try:
        from fastapi import Depends, FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import StreamingResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise ManyinoneError("serving needs FastAPI and uvicorn: pip install 'manyinone[serve]'") from None

    if api_key is not None and not api_key:
        raise ManyinoneError("api_key is empty; give a secret, or none to serve without authentication")
    engine = Engine(runtime, template, default_max_tokens, batch_rows=batch_rows, draft=draft)

    def authorized(request: Request) -> None:
        if request.url.path == "/health":  # load balancers probe it without a key
            return
        if api_key is not None and not secrets.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()):
            raise _Unauthorized

    app = FastAPI(title="manyinone", version="1", dependencies=[Depends(authorized)])
    app.state.engine = engine

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_request, _exc):
        return _error(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                      code="invalid_api_key")

    @app.exception_handler(Unsupported)
    async def _unsupported(_request, exc: Unsupported):
        return _error(400, str(exc), exc.field, code="unsupported_parameter")

    @app.exception_handler(OverLimit)
    async def _too_large(_request, exc: OverLimit):
        return _error(413, str(exc))

    @app.exception_handler(ManyinoneError)
    async def _bad_request(_request, exc: ManyinoneError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{field or 'request'}: {first.get('msg', 'invalid')}"
                           f" (got {first.get('input')!r:.80})", field or None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "manyinone",
                                           "exits": runtime.exits()}]}

    def envelope(kind: str, **body: Any) -> dict[str, Any]:
        return {"id": f"{kind}-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": model_name, **body}

    def next_event(events: "queue.Queue[tuple]") -> tuple | None:
        try:
            return events.get(timeout=0.25)
        except queue.Empty:
            return None

    def sse(job: dict[str, Any], chunk, request: Request) -> StreamingResponse:
        events, cancel = engine.start_stream(job)

        async def body():
            try:
                async for piece in pieces():
                    yield piece
            finally:  # the client went away (or the stream ended): stop generating
                cancel.set()

        async def pieces():
            while True:
                item = await run_in_threadpool(next_event, events)
                if await request.is_disconnected():
                    return
                if item is None:
                    continue
                if item[0] == "delta":
                    yield f"data: {json.dumps(chunk(item[1], None))}\n\n"
                    continue
                if item[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': item[1], 'type': 'server_error'}})}\n\n"
                else:
                    yield f"data: {json.dumps(chunk(None, item[1]))}\n\n"
                yield "data: [DONE]\n\n"
                return

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.refuse_unsupported()
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ManyinoneError("prompt: empty list; give at least one prompt")
        job = engine.check(req, prompts, req.max_tokens)
        if req.stream:
            base = envelope("cmpl", object="text_completion")

            def chunk(text, finish):
                return {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

            return sse(job, chunk, request)
        texts, finish, info = await run_in_threadpool(engine.complete, job)
        prompt_tokens = sum(len(p) for p in job["prompts"])
        return envelope("cmpl", object="text_completion", manyinone=info, choices=[
            {"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(zip(texts, finish))],
            usage=_usage(prompt_tokens, info["completion_tokens"]))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        req.refuse_unsupported()
        job = engine.check(req, [engine.chat_prompt(req.messages)], req.max_completion_tokens or req.max_tokens)
        if req.stream:
            base = envelope("chatcmpl", object="chat.completion.chunk")

            def chunk(text, finish):
                delta = {"role": "assistant", "content": text} if text is not None else {}
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return sse(job, chunk, request)
        texts, finish, info = await run_in_threadpool(engine.complete, job)
        return envelope("chatcmpl", object="chat.completion", manyinone=info, choices=[
            {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": finish[0]}],
            usage=_usage(len(job["prompts"][0]), info["completion_tokens"]))

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32", device: str = "auto",
          max_len: int | None = None, default_max_tokens: int = 256, max_batch: int = 16,
          max_cache_mib: float = DEFAULT_MAX_CACHE_MIB, api_key: str | None = None,
          batch_rows: int | str | None = "auto", fused: bool = False, draft: dict[str, Any] | None = None) -> None:
    """Load `ckpt` once and serve it until interrupted; plain requests share a continuous batch of
    `batch_rows` rows ("auto": up to AUTO_BATCH_ROWS, as many as `max_cache_mib` holds at this context;
    None: one request at a time); `fused` compiles each decode step (CUDA); `draft`:
    default draft settings for speculative requests (`Runtime.generate` names), checked against the
    full depth before the model loads."""
    try:
        import uvicorn
    except ImportError:
        raise ManyinoneError("serving needs FastAPI and uvicorn: pip install 'manyinone[serve]'") from None
    if not 0 < port < 65536:
        raise ManyinoneError(f"--port {port} out of range; allowed 1 to 65535")
    if draft and any(v is not None for v in draft.values()):
        from manyinone.io.checkpoint import read_index, resolve
        from manyinone.runtime.draft_policy import index_exits, validate

        index = read_index(ckpt)
        validate(True, index_exits(index), int(resolve(index, None)["depth"]), draft.get("draft_depth"),
                 draft.get("draft_tokens"), draft.get("draft_threshold"), draft.get("adaptive_draft"))
    runtime = Runtime.open(ckpt, dtype=dtype_named(dtype), device=device, max_len=max_len, max_batch=max_batch,
                           max_cache_mib=max_cache_mib, fused=fused)
    import sys

    if batch_rows == "auto":
        # A 13B export's row at 2,048 tokens is 640 MiB of cache (SmolLM2's: 45 MiB): a fixed 16 rows
        # would refuse to start under the default limit, so the batch takes the rows the limit holds.
        batch_rows = runtime.rows_within_cache(AUTO_BATCH_ROWS)
        if batch_rows < AUTO_BATCH_ROWS:
            print(f"continuous batch: {batch_rows} rows, what max_cache_mib {max_cache_mib:g} holds at context "
                  f"{runtime.max_len} (raise --max-cache-mib or lower --max-len for more)", file=sys.stderr, flush=True)
    template = (runtime.index or {}).get("train", {}).get("template", "alpaca")
    from pathlib import Path

    app = create_app(runtime, Path(ckpt).resolve().name, template, default_max_tokens, api_key,
                     batch_rows=batch_rows, draft=draft)
    where = "only this machine" if host in ("127.0.0.1", "localhost", "::1") else "the network"
    print(f"serving {ckpt} at http://{host}:{port}/v1 (OpenAI-compatible; reachable from {where}"
          f"{', bearer auth on' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")

