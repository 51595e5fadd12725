"""Chat templates: whether a model's prompts are wrapped in its tokenizer's chat template.

Two settings read this module: ``task.apply_chat_template`` (lm-eval's own setting, passed to
``simple_evaluate``) and ``probe.chat_template`` (the probe prompts). Each is ``auto`` (the
default: on exactly when the tokenizer has a chat template, so off for base models and on for
instruct models that ship one), ``true`` or ``false``. :func:`resolve` turns a setting into what is
done; a setting of ``true`` for a tokenizer without a template is refused (lm-eval would fail late,
and the probes would have nothing to apply).
"""
from __future__ import annotations

from typing import Any

from prunerep.errors import ConfigError

#: the values of task.apply_chat_template and probe.chat_template
SETTINGS = ("auto", True, False)


def check(value: Any, what: str) -> Any:
    """``value`` when it is a valid setting (``auto``, true, false); else ConfigError (one line)."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(f"{what}={value!r}; choose auto, true or false")


def has_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve(value: Any, tokenizer, what: str) -> bool:
    """Whether the chat template is applied: ``auto`` -> the tokenizer has one; true needs one."""
    value = check(value, what)
    if value == "auto":
        return has_template(tokenizer)
    if value and not has_template(tokenizer):
        raise ConfigError(f"{what}=true but the tokenizer has no chat template; use auto or false")
    return bool(value)


def as_user_turn(tokenizer, text: str) -> str:
    """``text`` as the user's turn of a one-turn chat, ending where the assistant's answer starts
    (the template's generation prompt): what lm-eval builds for a zero-shot context."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


__all__ = ["SETTINGS", "check", "has_template", "resolve", "as_user_turn"]
