"""Chat messages to a prompt: the model folder's chat template (jinja2, as transformers
renders it), or a plain role-tagged format for models without one (e.g. `tiny`)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from agentos.kernel.errors import InvalidRequestError

DEFAULT_TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call these functions, each call as <tool_call>\n"
    "{\"name\": ..., \"arguments\": {...}}\n</tool_call>:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n{\"name\": {{ c['function']['name'] | tojson }}, "
    "\"arguments\": {{ c['function']['arguments'] }}}\n</tool_call>{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render_chat(messages: list[dict[str, Any]], tokenizer, add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """Renders messages ({role, content, and tool_calls or tool_call_id}) and the tools
    (OpenAI's [{type: function, function: {...}}]) with the tokenizer's chat template (or
    the default one). Returns the prompt text. Raises InvalidRequestError when the template refuses
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
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
            bos_token=_special(tokenizer, tokenizer.bos_token_id),
            eos_token=_special(tokenizer, (tokenizer.eos_token_ids or [None])[0]))
    except jinja2.TemplateError as e:
        raise InvalidRequestError(f"chat template failed: {e}") from None


def _special(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)


# --------------------------------------------------------------------------- tool calls

MAX_TOOLS = 128  # functions per request


class ToolFormat:
    """How a model family writes tool calls: each call's JSON object ({"name": ..., and
    the arguments under `args_key`}) between `open` and `close`, several joined by `sep`.
    `start` is what begins a message of calls (the text a parser looks for)."""

    def __init__(self, name: str, open: str, close: str, sep: str, args_key: str,
                 before: str = "", after: str = ""):
        self.name, self.open, self.close, self.sep = name, open, close, sep
        self.args_key, self.before, self.after = args_key, before, after

    @property
    def start(self) -> str:
        return (self.before + self.open).strip() or "{"

    def grammar(self, functions: list[dict], parallel: bool) -> str:
        """The Lark grammar (llguidance's, with inline JSON schemas) of a message that is
        one tool call, or several when `parallel`, of the given functions."""
        one = {"anyOf": [{
            "type": "object",
            "properties": {"name": {"const": f["name"]},
                           self.args_key: f.get("parameters") or {"type": "object"}},
            "required": ["name", self.args_key], "additionalProperties": False,
        } for f in functions], "x-guidance": {"whitespace_flexible": False}}
        more = f"({_lark_str(self.sep)} call)*" if parallel else ""
        return (f"start: {_seq(self.before, 'call', more, self.after)}\n"
                f"call: {_seq(self.open, 'body', '', self.close)}\n"
                f"body: %json {json.dumps(one)}\n")

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content before the calls or None, the calls as OpenAI tool_calls) of a message;
        no calls when it holds none that parse."""
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        rest = text[at + len(self.start):] if self.start != "{" else text[at:]
        while True:
            i = rest.find("{")
            if i < 0:
                break
            try:
                obj, end = decoder.raw_decode(rest, i)
            except ValueError:
                break
            rest = rest[end:]
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                continue
            args = obj.get(self.args_key, obj.get("arguments", obj.get("parameters", {})))
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": obj["name"], "arguments": json.dumps(args)}})
        if not calls:
            return text, []
        content = text[:at].strip()
        return content or None, calls


FORMATS = {
    # Qwen2/2.5/3 and Hermes templates, and the default template
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments"),
    # Mistral's templates: [TOOL_CALLS] then a JSON list of calls
    "mistral": ToolFormat("mistral", "", "", ", ", "arguments", before="[TOOL_CALLS][",
                          after="]"),
    # Llama 3.1+ templates: a bare JSON object with "parameters"
    "llama3_json": ToolFormat("llama3_json", "", "", "; ", "parameters"),
}


def tool_format(tokenizer) -> ToolFormat:
    """The tool-call format the model's chat template writes (hermes by default)."""
    template = tokenizer.chat_template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" in template or not template:
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or "ipython" in template:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def _lark_str(s: str) -> str:
    return json.dumps(s)


def _seq(before: str, rule: str, more: str, after: str) -> str:
    """A Lark sequence: the literal `before`, the rule, `more`, the literal `after` (empty
    literals left out)."""
    parts = [_lark_str(before) if before else "", rule, more, _lark_str(after) if after else ""]
    return " ".join(p for p in parts if p)
