"""OpenAI-compatible HTTP server over one `Runtime`: /v1/completions, /v1/chat/completions (both with
`stream`), /v1/models. Extra per-request fields: `budget` (fraction of the full cost) and `speculative`.

Needs the optional extra: `pip install manyinone[serve]` (FastAPI + uvicorn). Requests are checked
before any work starts (a bad budget or an over-long prompt is a 400 naming the value); generation
runs one request at a time on a worker thread, so concurrent requests queue instead of clashing.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from manyinone.core.errors import ManyinoneError
from manyinone.runtime.generate import Runtime, dtype_named
from manyinone.runtime.sampling import Sampling
from manyinone.runtime.speculative import draft_settings


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, ...)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    budget: Optional[float] = None
    speculative: bool = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param, "code": None}})


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class Engine:
    """Turns checked requests into generation on one worker thread at a time."""

    def __init__(self, runtime: Runtime, template: str, default_max_tokens: int = 256) -> None:
        self.runtime, self.template, self.default_max_tokens = runtime, template, default_max_tokens
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of a chat, encoded as training encoded prompts (one BOS, never two)."""
        tok = self.runtime.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                           add_generation_prompt=True)
            return self.runtime.encode(text, "chat")
        from manyinone.train.data import encode_prompt

        # No chat template: the checkpoint's training template around the last user message.
        user = [m.content for m in messages if m.role == "user"] or [messages[-1].content]
        template = "alpaca" if self.template == "chat" else self.template
        return encode_prompt({"instruction": user[-1], "input": "", "output": ""}, tok, template)

    def check(self, req: _Common, prompts: list[str | list[int]], max_tokens: int | None) -> dict[str, Any]:
        """Everything a bad request could get wrong, before any work: raises ManyinoneError."""
        rt = self.runtime
        depth = rt.depth_for(req.budget)
        extra = 0
        if req.speculative:
            if depth == 1:
                raise ManyinoneError("speculative decoding needs a depth above 1; raise the budget or set speculative false")
            extra = draft_settings(rt, depth, None, None)[1]  # the draft may run k slots past the answer
        ids = [p if isinstance(p, list) else rt.encode(p) for p in prompts]  # text or already-encoded ids
        if req.stream and len(ids) > 1:
            raise ManyinoneError("stream supports one prompt per request; got a list of prompts")
        max_new = max_tokens or self.default_max_tokens
        rt.check_request(ids, max_new, extra)
        # Without a seed each request samples afresh (as OpenAI's API does); with one it replays exactly.
        sampling = Sampling(req.temperature, req.top_p, req.seed if req.seed is not None else secrets.randbits(31))
        return {"prompts": ids, "budget": req.budget, "max_new_tokens": max_new, "sampling": sampling,
                "speculative": req.speculative, "stops": req.stops(), "depth": depth}

    def complete(self, job: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
        """Non-streaming: texts, finish reasons, and the generation's info (blocking; takes the lock)."""
        with self.lock:
            out = self.runtime.generate(job["prompts"], job["budget"], job["max_new_tokens"], job["sampling"],
                                        speculative=job["speculative"])
        texts, finish = [], []
        for tokens, reason in zip(out.tokens, out.finish):
            text, stopped = cut_at_stop(self.runtime.decode(tokens), job["stops"])
            texts.append(text)
            finish.append("stop" if stopped else reason)
        info = {"depth": out.depth, "completion_tokens": sum(len(t) for t in out.tokens), **out.stats}
        return texts, finish, info

    def start_stream(self, job: dict[str, Any]) -> "queue.Queue[tuple]":
        """Streaming: a worker thread puts ("delta", text) items, then ("done", finish, tokens) or ("error", msg)."""
        events: queue.Queue[tuple] = queue.Queue()
        threading.Thread(target=self._stream_worker, args=(job, events), daemon=True).start()
        return events

    def _stream_worker(self, job: dict[str, Any], events: "queue.Queue[tuple]") -> None:
        rt = self.runtime
        try:
            with self.lock:
                if job["speculative"]:
                    from manyinone.runtime.speculative import speculative_stream

                    steps = speculative_stream(rt, job["prompts"][0], job["budget"], job["max_new_tokens"],
                                               job["sampling"], None)
                else:
                    steps = rt.stream(job["prompts"], job["budget"], job["max_new_tokens"], job["sampling"])
                tokens, sent, finish = [], "", "length"
                for step in steps:
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


def create_app(runtime: Runtime, model_name: str, template: str = "alpaca", default_max_tokens: int = 256):
    """The FastAPI app serving `runtime` under the name `model_name`."""
    try:
        from fastapi import FastAPI
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import StreamingResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise ManyinoneError("serving needs FastAPI and uvicorn: pip install 'manyinone[serve]'") from None

    engine = Engine(runtime, template, default_max_tokens)
    app = FastAPI(title="manyinone", version="1")

    @app.exception_handler(ManyinoneError)
    async def _bad_request(_request, exc: ManyinoneError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{field or 'request'}: {first.get('msg', 'invalid')}"
                           f" (got {first.get('input')!r})", field or None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "manyinone",
                                           "exits": runtime.exits()}]}

    def envelope(kind: str, **body: Any) -> dict[str, Any]:
        return {"id": f"{kind}-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": model_name, **body}

    def sse(job: dict[str, Any], chunk) -> StreamingResponse:
        events = engine.start_stream(job)

        async def body():
            while True:
                item = await run_in_threadpool(events.get)
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
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ManyinoneError("prompt: empty list; give at least one prompt")
        job = engine.check(req, prompts, req.max_tokens)
        if req.stream:
            base = envelope("cmpl", object="text_completion")

            def chunk(text, finish):
                return {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

            return sse(job, chunk)
        texts, finish, info = await run_in_threadpool(engine.complete, job)
        prompt_tokens = sum(len(p) for p in job["prompts"])
        return envelope("cmpl", object="text_completion", manyinone=info, choices=[
            {"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(zip(texts, finish))],
            usage=_usage(prompt_tokens, info["completion_tokens"]))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        job = engine.check(req, [engine.chat_prompt(req.messages)], req.max_completion_tokens or req.max_tokens)
        if req.stream:
            base = envelope("chatcmpl", object="chat.completion.chunk")

            def chunk(text, finish):
                delta = {"role": "assistant", "content": text} if text is not None else {}
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return sse(job, chunk)
        texts, finish, info = await run_in_threadpool(engine.complete, job)
        return envelope("chatcmpl", object="chat.completion", manyinone=info, choices=[
            {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": finish[0]}],
            usage=_usage(len(job["prompts"][0]), info["completion_tokens"]))

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32", device: str = "auto",
          max_len: int | None = None, default_max_tokens: int = 256) -> None:
    """Load `ckpt` once and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ManyinoneError("serving needs FastAPI and uvicorn: pip install 'manyinone[serve]'") from None
    runtime = Runtime.open(ckpt, dtype=dtype_named(dtype), device=device, max_len=max_len)
    template = (runtime.index or {}).get("train", {}).get("template", "alpaca")
    from pathlib import Path

    app = create_app(runtime, Path(ckpt).resolve().name, template, default_max_tokens)
    uvicorn.run(app, host=host, port=port, log_level="info")

