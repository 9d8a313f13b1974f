"""Chat messages to a prompt: the model folder's chat template (jinja2, as transformers
renders it), or a plain role-tagged format for models without one (e.g. `tiny`)."""

from __future__ import annotations

from typing import Any

from agentos.kernel.errors import InvalidRequestError

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: list[dict[str, Any]], tokenizer, add_generation_prompt: bool = True) -> str:
    """Renders messages ({role, content}) with the tokenizer's chat template (or the default
    one). Returns the prompt text. Raises InvalidRequestError when the template refuses
    the messages (e.g. roles out of order)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise InvalidRequestError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    source = tokenizer.chat_template or DEFAULT_TEMPLATE
    try:
        return env.from_string(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_special(tokenizer, tokenizer.bos_token_id),
            eos_token=_special(tokenizer, (tokenizer.eos_token_ids or [None])[0]))
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"chat template failed: {e}") from None


def _special(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)
