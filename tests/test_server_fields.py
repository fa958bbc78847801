"""The server answers OpenAI fields it does not implement with a 400 naming them (never silently
ignoring them), accepts their "off" values, and formats chats in the template training used."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from manyinone.io.api import open_checkpoint  # noqa: E402
from manyinone.runtime import Runtime  # noqa: E402
from manyinone.runtime.server import UNSUPPORTED, Engine, Message, create_app  # noqa: E402
from manyinone.train.data import encode_prompt  # noqa: E402

ON = {  # a value of each unsupported field that asks for the feature
    "n": 2, "best_of": 3, "logprobs": True, "top_logprobs": 2, "echo": True, "suffix": "end",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
    "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
    "response_format": {"type": "json_object"}, "logit_bias": {"5": 10}, "presence_penalty": 0.5,
    "frequency_penalty": -1.0, "stream_options": {"include_usage": True}, "audio": {"voice": "alloy"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
}
OFF = {"n": 1, "best_of": 1, "logprobs": False, "top_logprobs": 0, "echo": False, "tools": [], "tool_choice": "none",
       "response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
       "stream_options": {"include_usage": False}, "modalities": ["text"], "user": "someone", "metadata": {"a": "b"}}


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient

    nested = open_checkpoint(trained_run)
    runtime = Runtime(nested.model, nested.tokenizer, nested.index, max_len=320)
    with TestClient(create_app(runtime, "tiny", default_max_tokens=2, batch_rows=None)) as c:
        yield c


def test_every_unsupported_field_has_a_case():
    assert set(ON) == set(UNSUPPORTED)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize("field", sorted(ON))
def test_unsupported_field_is_a_400_naming_it(client, endpoint, field):
    body = {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    reply = client.post(f"/v1/{endpoint}", json={**body, "max_tokens": 2, field: ON[field]})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"{field}=") and "not supported" in error["message"]


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_off_values_and_harmless_fields_are_accepted(client, endpoint):
    body = {"prompt": "hi"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    reply = client.post(f"/v1/{endpoint}", json={**body, "max_tokens": 2, **OFF})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1


@pytest.fixture
def runtime_with_chat_template(trained_run):
    from helpers import CHAT_TEMPLATE

    nested = open_checkpoint(trained_run)
    tok = copy.deepcopy(nested.tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return Runtime(nested.model, tok, nested.index, max_len=320)


def test_chat_uses_the_template_the_checkpoint_was_trained_with(runtime_with_chat_template):
    """The tokenizer has a chat template, but an Alpaca-trained checkpoint gets the Alpaca prompt (as
    training encoded it); a chat-trained one gets the chat template."""
    rt = runtime_with_chat_template
    messages = [Message(role="system", content="Be brief."), Message(role="user", content="Name a colour.")]
    record = {"instruction": "Name a colour.", "input": "", "output": ""}
    alpaca = Engine(rt, template="alpaca").chat_prompt(messages)
    assert alpaca == encode_prompt(record, rt.tokenizer, "alpaca")
    assert "### Instruction:\nName a colour." in rt.tokenizer.decode(alpaca)
    chat = Engine(rt, template="chat").chat_prompt(messages)
    assert rt.tokenizer.decode(chat) == "<s>system: Be brief.\n<s>user: Name a colour.\nassistant: "


def test_serve_binds_localhost_by_default_and_says_where():
    import inspect

    from manyinone.cli.main import serve as serve_command
    from manyinone.runtime.server import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_command).parameters["host"].default.default == "127.0.0.1"
