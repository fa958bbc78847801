"""`manyinone serve` with continuous batching: concurrent requests at mixed budgets share decode steps,
each answer equals that budget served alone (greedy), streaming works, and bad input is a 400 (413 for
too many prompts) that leaves the server serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from manyinone.runtime.server import create_app  # noqa: E402
from test_server import MAX_LEN, running, tiny_runtime  # noqa: E402


@pytest.fixture(scope="module")
def batched(trained_run):
    runtime = tiny_runtime(trained_run, max_batch=4)
    app = create_app(runtime, "tiny", template="alpaca", default_max_tokens=8, batch_rows=6)
    with running(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), runtime, app


def test_mixed_budget_requests_share_steps_and_equal_serving_alone(batched):
    client, runtime, app = batched
    budgets = [0.6, 1.0, None] * 4

    def ask(i: int) -> str:
        kwargs = dict(model="tiny", prompt=f"prompt number {i}", max_tokens=10, temperature=0,
                      extra_body={} if budgets[i] is None else {"budget": budgets[i]})
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
        return client.completions.create(**kwargs).choices[0].text

    steps_before = app.state.engine.batcher.steps
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(12)))
    for i, text in enumerate(answers):
        alone = runtime.generate([runtime.encode(f"prompt number {i}")], budget=budgets[i], max_new_tokens=10)
        assert text == runtime.decode(alone.tokens[0]), i
    # Shared steps: far fewer decode steps than tokens produced one request at a time.
    assert app.state.engine.batcher.steps - steps_before < 12 * 10 * 0.8


def test_list_of_prompts_and_speculative_still_work_beside_the_batch(batched):
    client, runtime, _ = batched
    out = client.completions.create(model="tiny", prompt=["ab", "a longer prompt"], max_tokens=6, temperature=0)
    single = runtime.generate([runtime.encode("a longer prompt")], max_new_tokens=6)
    assert out.choices[1].text == runtime.decode(single.tokens[0]) and out.model_extra["manyinone"]["batched"]
    spec = client.completions.create(model="tiny", prompt="a longer prompt", max_tokens=6, temperature=0,
                                     extra_body={"speculative": True})
    assert spec.choices[0].text == out.choices[1].text and spec.model_extra["manyinone"]["drafted"] > 0


def test_draft_settings_beside_the_batch_are_used_and_bad_ones_are_400(batched):
    """A speculative request with draft fields runs alone between batch steps, uses them and equals the
    batched plain answer; a bad draft value is still a 400 naming it, and the batch keeps serving."""
    client, _, _ = batched
    plain = client.completions.create(model="tiny", prompt="a longer prompt", max_tokens=6, temperature=0)
    spec = client.completions.create(model="tiny", prompt="a longer prompt", max_tokens=6, temperature=0,
                                     extra_body={"speculative": True, "draft_exit": 2, "draft_tokens": 3})
    info = spec.model_extra["manyinone"]
    assert spec.choices[0].text == plain.choices[0].text and (info["draft_depth"], info["draft_tokens"]) == (2, 3)
    for extra, message in [({"speculative": True, "draft_tokens": 17}, "draft length 17 out of range"),
                           ({"draft_exit": 2}, 'draft settings need "speculative": true')]:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body=extra)
        assert err.value.status_code == 400 and message in err.value.body["message"]
    again = client.completions.create(model="tiny", prompt="a longer prompt", max_tokens=6, temperature=0)
    assert again.choices[0].text == plain.choices[0].text and again.model_extra["manyinone"]["batched"]


@pytest.mark.parametrize("kwargs,status,message", [
    ({"extra_body": {"budget": 0.1}}, 400, "below the smallest sub-model"),
    ({"prompt": "x" * (MAX_LEN - 4), "max_tokens": 8}, 400, "exceeds the context limit"),
    ({"prompt": ["hi"] * 5}, 413, "exceed the limit of 4 (max_batch)"),
])
def test_bad_input_is_refused_and_the_server_keeps_serving(batched, kwargs, status, message):
    client, runtime, _ = batched
    args = {"model": "tiny", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**args)
    assert err.value.status_code == status and message in err.value.body["message"]
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
    assert ok.choices[0].text == runtime.decode(runtime.generate([runtime.encode("hi")], max_new_tokens=4).tokens[0])


def test_serve_fits_its_default_batch_to_the_cache_limit(trained_run, monkeypatch, capsys):
    """A model whose 16 rows outgrow max_cache_mib (a 13B export under the 4 GiB default) still starts:
    the batch takes the rows the limit holds, and says so; rows asked for explicitly stay strict."""
    import uvicorn

    from manyinone.core.errors import ManyinoneError
    from manyinone.runtime import server

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app))
    row_mib = tiny_runtime(trained_run).cache_bytes(1) / 2**20
    server.serve(str(trained_run), max_len=MAX_LEN, max_cache_mib=3.5 * row_mib)
    assert started["app"].state.engine.batcher.size == 3
    assert "continuous batch: 3 rows" in capsys.readouterr().err
    server.serve(str(trained_run), max_len=MAX_LEN, max_cache_mib=40 * row_mib)
    assert started["app"].state.engine.batcher.size == server.AUTO_BATCH_ROWS
    with pytest.raises(ManyinoneError, match="a batch of 16 rows needs .* lower the batch rows"):
        server.serve(str(trained_run), max_len=MAX_LEN, max_cache_mib=3.5 * row_mib, batch_rows=16)
