"""Chat formatting: a tokenizer's chat template, or ChatML when jinja2 is unavailable."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence

from ffa_jax.errors import WeightsError

_SYSTEM_DEFAULT = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def chatml(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """A ChatML rendering (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message), as
    SmolLM2's template: when ``default_system`` is given and the first message is not a system
    message, that system message is prepended. Used when jinja2 is unavailable."""
    out = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _jinja2_available() -> bool:
    return importlib.util.find_spec("jinja2") is not None


def render_chat(
    tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str | None:
    """The prompt text for ``messages`` under the tokenizer's chat template, or ``None`` when the
    tokenizer has no chat template.

    The template (jinja2, ``tokenizer.apply_chat_template``) is used when jinja2 is installed;
    otherwise a ChatML template is rendered by :func:`chatml` (with the template's default
    system message, if it has one), and any other template raises.

    Raises:
      WeightsError: jinja2 is missing and the template is not ChatML.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if _jinja2_available():
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    if "<|im_start|>" in template:
        m = _SYSTEM_DEFAULT.search(template)
        default = m.group(1).replace("\\n", "\n") if m else None
        return chatml(messages, add_generation_prompt=add_generation_prompt, default_system=default)
    raise WeightsError(
        "the tokenizer's chat template needs jinja2 (`pip install jinja2`); only ChatML templates "
        "are rendered without it."
    )
