"""OpenAI request fields the server does not implement, and the value of each that asks for nothing.

A request that sets one to anything else is answered with a 400 naming the field (`Unsupported`),
never with an answer that silently ignored it.
"""

from __future__ import annotations

from typing import Any


def _off(*defaults: Any):
    """A value that asks for nothing: absent, null, or one of `defaults`."""
    return lambda value: value is None or any(value == d and type(value) is type(d) for d in defaults)


# OpenAI fields that would change the answer and that manyinone does not implement: a request that
# sets one to anything but its "off" value gets a 400 naming it, never an answer that silently
# ignores it. Fields that change nothing here (user, metadata, store, service_tier) are accepted.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (_off(1), "one choice per prompt; send n separate requests (or a list of prompts)"),
    "best_of": (_off(1), "one candidate per prompt"),
    "logprobs": (_off(False), "token log-probabilities are not returned"),
    "top_logprobs": (_off(0), "token log-probabilities are not returned"),
    "echo": (_off(False), "the prompt is not echoed back"),
    "suffix": (_off(""), "no insertion (suffix) completions"),
    "tools": (_off([]), "no tool calling"),
    "tool_choice": (_off("none"), "no tool calling"),
    "functions": (_off([]), "no function calling"),
    "function_call": (_off("none"), "no function calling"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "no JSON mode or structured outputs"),
    "logit_bias": (_off({}), "no logit bias"),
    "presence_penalty": (_off(0, 0.0), "no presence penalty"),
    "frequency_penalty": (_off(0, 0.0), "no frequency penalty"),
    "stream_options": (lambda v: v is None or not (isinstance(v, dict) and v.get("include_usage")),
                       "no usage chunk in streams"),
    "audio": (_off(), "text only"),
    "modalities": (lambda v: v is None or v == ["text"], "text only"),
    "prediction": (_off(), "no predicted outputs"),
}


class Unsupported(Exception):
    """A request set an OpenAI field manyinone does not implement (answered with a 400 naming it)."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"{field}={value!r:.60} is not supported by manyinone ({why}); leave it out")
        self.field = field
