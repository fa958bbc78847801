"""`manyinone serve`: a real uvicorn server on a free local port, driven by the real `openai` client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from manyinone.io.api import open_checkpoint  # noqa: E402
from manyinone.runtime import Runtime  # noqa: E402
from manyinone.runtime.server import Engine, Message, create_app  # noqa: E402
from manyinone.train.data import tokenize_records, encode_prompt  # noqa: E402

MAX_LEN = 320


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free local port; yields the base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def tiny_runtime(ckpt, **limits) -> Runtime:
    nested = open_checkpoint(ckpt)
    return Runtime(nested.model, nested.tokenizer, nested.index, max_len=MAX_LEN, **limits)


@pytest.fixture(scope="module")
def server(trained_run):
    runtime = tiny_runtime(trained_run)
    with running(create_app(runtime, "tiny", template="alpaca", default_max_tokens=16)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), runtime


def test_completion_stream_and_budget(server):
    client, runtime = server
    full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.prompt_tokens == len("Hello there")
    ids = runtime.encode("Hello there")
    expected = runtime.generate([ids], max_new_tokens=12)
    assert full.choices[0].text == runtime.decode(expected.tokens[0])
    streamed = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    half = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                     extra_body={"budget": 0.6})
    assert half.model_extra["manyinone"]["depth"] == runtime.depth_for(0.6) < runtime.num_layers
    spec = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                     extra_body={"speculative": True})
    assert spec.choices[0].text == full.choices[0].text and spec.model_extra["manyinone"]["drafted"] > 0


def test_chat_plain_and_streamed_speculative(server):
    client, runtime = server
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].message.role == "assistant"
    # The reply is greedy decoding of the message in the checkpoint's training template (not a constant):
    prompt = encode_prompt({"instruction": "Name a colour.", "input": "", "output": ""}, runtime.tokenizer, "alpaca")
    expected = runtime.generate([prompt], max_new_tokens=10)
    assert plain.choices[0].message.content == runtime.decode(expected.tokens[0])
    assert plain.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"speculative": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_list_of_prompts_is_batched(server):
    client, runtime = server
    out = client.completions.create(model="tiny", prompt=["ab", "a longer prompt"], max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    single = client.completions.create(model="tiny", prompt="a longer prompt", max_tokens=6, temperature=0)
    assert out.choices[1].text == single.choices[0].text


@pytest.mark.parametrize("kwargs,message", [
    ({"extra_body": {"budget": 0.0}}, "budget 0.0 out of range"),
    ({"extra_body": {"budget": 0.1}}, "below the smallest sub-model"),
    ({"extra_body": {"budget": "half"}}, "budget"),
    ({"prompt": "x" * (MAX_LEN - 4), "max_tokens": 8}, "exceeds the context limit"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"n": 2}, "n=2 is not supported"),
])
def test_bad_requests_get_a_400_naming_the_problem(server, kwargs, message):
    client, _ = server
    args = {"model": "tiny", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    assert err.value.status_code == 400 and message in err.value.body["message"]


def test_concurrent_requests_all_succeed(server):
    client, _ = server

    def ask(i: int) -> str:
        stream = i % 2 == 0
        kwargs = dict(model="tiny", prompt=f"prompt {i}", max_tokens=8, temperature=0,
                      extra_body={"budget": 0.6 if i % 3 == 0 else 1.0, "speculative": i % 4 == 1})
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
        return client.completions.create(**kwargs).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(ask, range(12)))
    assert first == [ask(i) for i in range(12)]  # same answers as one at a time: no cross-talk
    assert client.models.list().data[0].id == "tiny"


def test_chat_prompt_has_one_bos_exactly_as_training_encoded_it(trained_run):
    """A tokenizer that adds BOS, with a chat template that writes it too: the server's prompt ids are the
    ids training used for the same message (one BOS), not the tokenizer default (two)."""
    from tokenizers.processors import TemplateProcessing

    from helpers import BOS_ID, CHAT_TEMPLATE

    nested = open_checkpoint(trained_run)
    tok = nested.tokenizer
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok.chat_template = CHAT_TEMPLATE
    assert tok("hi")["input_ids"][0] == BOS_ID  # the tokenizer default adds a BOS
    engine = Engine(Runtime(nested.model, tok, nested.index, max_len=MAX_LEN), template="chat")
    ids = engine.chat_prompt([Message(role="user", content="Name a colour.")])
    trained = tokenize_records([{"instruction": "Name a colour.", "input": "", "output": "x"}], tok, 512, "chat")[0]
    prompt_len = trained.labels.index(next(label for label in trained.labels if label != -100))
    assert ids == trained.input_ids[:prompt_len]
    assert ids.count(BOS_ID) == 1


# --- hostile requests (issue 11, items 8-11) ------------------------------------------------------
@pytest.fixture(scope="module")
def raw(server):
    """POST raw JSON bytes (what no well-behaved client sends) to the shared server."""
    import httpx

    client, _ = server
    with httpx.Client(base_url=str(client.base_url), timeout=60) as http:
        yield lambda body: http.post("completions", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("field,body", [
    ("seed", '{"prompt": "hi", "max_tokens": 2, "seed": 18446744073709551617}'),
    ("seed", '{"prompt": "hi", "max_tokens": 2, "seed": 1e3}'),
    ("prompt", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("prompt", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("stop", '{"prompt": "hi", "max_tokens": 2, "stop": ""}'),
    ("stop", '{"prompt": "hi", "max_tokens": 2, "stop": ["a", ""]}'),
    ("max_tokens", '{"prompt": "hi", "max_tokens": true}'),
    ("max_tokens", '{"prompt": "hi", "max_tokens": "4"}'),
    ("stream", '{"prompt": "hi", "max_tokens": 2, "stream": "yes"}'),
    ("speculative", '{"prompt": "hi", "max_tokens": 2, "speculative": 1}'),
    ("temperature", '{"prompt": "hi", "max_tokens": 2, "temperature": NaN}'),
    ("budget", '{"prompt": "hi", "max_tokens": 2, "budget": true}'),
    ("prompt", '{"prompt": 5, "max_tokens": 2}'),
])
def test_wrongly_typed_or_invalid_fields_get_a_400_naming_the_field(raw, field, body):
    reply = raw(body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith(field), reply.json()


def test_limits_refuse_with_413_and_caches_are_freed(trained_run):
    runtime = tiny_runtime(trained_run, max_batch=6, max_cache_mib=1.0)
    per_row = runtime.cache_bytes(1)
    assert 3 * per_row <= 2**20 < 4 * per_row  # the tiny model's cache: 3 rows fit in 1 MiB, 4 do not
    import httpx

    with running(create_app(runtime, "tiny", default_max_tokens=2)) as url:
        for rows in (1, 2, 3, 1, 3, 2):  # each batch size once kept: 6 rows, over the limit unless freed
            reply = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * rows, "max_tokens": 2}, timeout=60)
            assert reply.status_code == 200, reply.text
            assert sum(map(runtime.cache_bytes, runtime._runners)) <= 2**20
        over_memory = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * 4, "max_tokens": 2}, timeout=60)
        over_batch = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * 7, "max_tokens": 2}, timeout=60)
    assert over_memory.status_code == 413 and "MiB of KV cache, over the limit of 1 MiB" in over_memory.text
    assert over_batch.status_code == 413 and "exceed the limit of 6 (max_batch)" in over_batch.text


def test_a_stream_stops_when_its_client_disconnects(trained_run):
    import httpx

    runtime = tiny_runtime(trained_run)
    produced = []
    real_stream = runtime.stream

    def slow_stream(*args, **kwargs):  # never stops on its own: 300 steps of 20 ms
        for step in real_stream(*args, **{**kwargs, "stop_ids": set()}):
            produced.append(1)
            time.sleep(0.02)
            yield step

    runtime.stream = slow_stream
    app = create_app(runtime, "tiny")
    with running(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 300, "stream": True, "temperature": 0}) as reply:
            next(reply.iter_lines())  # one chunk arrives, then the client goes away
        deadline = time.time() + 5
        while app.state.engine.cancelled == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.engine.cancelled == 1
        assert len(produced) < 100
        runtime.stream = real_stream
        quick = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert quick.status_code == 200 and quick.elapsed.total_seconds() < 2


def test_api_key_is_required_when_set(trained_run):
    import httpx

    app = create_app(tiny_runtime(trained_run), "tiny", default_max_tokens=2, api_key="s3cret")
    body = {"prompt": "hi", "max_tokens": 2}
    with running(app) as url:
        missing = httpx.post(f"{url}/v1/completions", json=body)
        wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        models = httpx.get(f"{url}/v1/models")
        health = httpx.get(f"{url}/health")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
    assert missing.status_code == wrong.status_code == models.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key" and health.status_code == 200


@pytest.mark.parametrize("extra,message", [
    ('"speculative": true, "draft_exit": 4', "draft exit 4 out of range; allowed 1..3 (shallower than the serving depth 4)"),
    ('"speculative": true, "draft_tokens": 0', "draft length 0 out of range; allowed 1..16"),
    ('"speculative": true, "draft_tokens": 17', "draft length 17 out of range; allowed 1..16"),
    ('"speculative": true, "draft_threshold": 1.5', "draft threshold 1.5 out of range; allowed 0 < threshold < 1"),
    ('"draft_exit": 2', 'draft_exit: draft settings need "speculative": true'),
])
def test_bad_draft_settings_get_a_400_naming_the_range(raw, extra, message):
    reply = raw('{"prompt": "hi", "max_tokens": 2, ' + extra + "}")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith(message), reply.json()


def test_draft_settings_in_a_request_are_used_and_lossless(server):
    client, runtime = server
    plain = client.completions.create(model="tiny", prompt=["Hello", "A longer prompt"], max_tokens=10, temperature=0)
    spec = client.completions.create(model="tiny", prompt=["Hello", "A longer prompt"], max_tokens=10, temperature=0,
                                     extra_body={"speculative": True, "draft_exit": 2, "draft_tokens": 3,
                                                 "draft_threshold": 0.2})
    assert [c.text for c in spec.choices] == [c.text for c in plain.choices]
    info = spec.model_extra["manyinone"]
    assert (info["draft_depth"], info["draft_tokens"], info["threshold"]) == (2, 3, 0.2)
