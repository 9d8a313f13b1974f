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


class ToolCallStream:
    """Tool calls as OpenAI streams them, from text arriving in pieces: each call's id,
    type and name as soon as its name is complete, then its arguments' JSON as it grows.

    A character scanner over the calls' JSON objects (strings, escapes and nesting
    tracked), so each piece costs its own length, not the text's. Only objects whose
    name comes before their arguments stream early (the order the constrained grammar
    writes); any other is sent whole once complete. Text outside the objects (the
    format's markers) is skipped."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self.calls: list[dict] = []  # per object: id, name, args (start, end), sent, done
        self._pos = 0
        self._depth = 0
        self._in_str = self._esc = False
        self._str_start = 0
        self._expect = "key"
        self._key: str | None = None

    def push(self, piece: str) -> list[dict]:
        """Takes more text; returns the tool_calls deltas it completes."""
        self.text += piece
        self._scan()
        return self._deltas(final=False)

    def end(self) -> list[dict]:
        """The deltas still owed at the end (calls sent whole, the last arguments)."""
        return self._deltas(final=True)

    def _scan(self) -> None:
        text, keys = self.text, (self.fmt.args_key, "arguments", "parameters")
        for i in range(self._pos, len(text)):
            c = text[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
                    if self._depth == 1:
                        self._string(text[self._str_start : i + 1])
            elif c == '"':
                self._in_str, self._str_start = True, i
            elif c in "{[":
                if self._depth == 0:
                    if c == "[":
                        continue  # Mistral's list of calls
                    self.calls.append({"id": None, "name": None, "args": [None, None],
                                       "sent": 0, "done": False, "start": i})
                    self._expect, self._key = "key", None
                elif self._depth == 1 and self._expect == "value" and self._key in keys:
                    self.calls[-1]["args"][0] = i
                self._depth += 1
            elif c in "}]" and self._depth > 0:
                self._depth -= 1
                call = self.calls[-1]
                if self._depth == 1 and call["args"][0] is not None and call["args"][1] is None:
                    call["args"][1] = i + 1
                elif self._depth == 0:
                    call["done"], call["end"] = True, i + 1
            elif self._depth == 1 and c in ":,":
                self._expect = "value" if c == ":" else "key"
        self._pos = len(text)

    def _string(self, literal: str) -> None:
        try:
            value = json.loads(literal)
        except ValueError:
            return
        if self._expect == "key":
            self._key = value
        elif self._key == "name" and self.calls[-1]["name"] is None:
            self.calls[-1]["name"] = value

    def _deltas(self, final: bool) -> list[dict]:
        out = []
        for index, call in enumerate(self.calls):
            early = call["name"] is not None and call["args"][0] is not None
            if not (early or call["done"] or final) or call["name"] is None:
                continue
            if call["id"] is None:
                call["id"] = "call_" + uuid.uuid4().hex[:24]
                out.append({"index": index, "id": call["id"], "type": "function",
                            "function": {"name": call["name"], "arguments": ""}})
            start, end = call["args"]
            if start is None:  # no arguments seen: whatever the object holds, once done
                if call["done"] and not call["sent"]:
                    obj = json.loads(self.text[call["start"] : call["end"]])
                    args = obj.get(self.fmt.args_key, obj.get("arguments", obj.get("parameters", {})))
                    call["sent"] = 1
                    out.append({"index": index, "function": {"arguments": json.dumps(args)}})
                continue
            upto = end if end is not None else len(self.text)
            piece = self.text[start + call["sent"] : upto]
            if piece:
                call["sent"] += len(piece)
                out.append({"index": index, "function": {"arguments": piece}})
        return out
