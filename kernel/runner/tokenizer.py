"""Tokenizers: text <-> token ids, and streaming detokenization of generated ids.

`ByteTokenizer` is the embedded default (UTF-8 bytes plus four specials), so the tiny
model needs no download. `HFTokenizer` wraps a `tokenizers.Tokenizer` read from a HF
folder. `IncrementalDetokenizer` turns a stream of generated ids into text deltas.
"""

from __future__ import annotations

import codecs
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import tokenizers

# NOTE: a UTF-8 character spans at most 4 byte tokens; anything held back longer than this
# is garbage (invalid bytes or a long run of skipped specials) and is emitted as is.
_MAX_PENDING = 16
_REPLACEMENT = "\ufffd"


class Tokenizer(ABC):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    chat_template: str | None = None  # jinja2 source from the model folder, if it has one

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Returns the ids of `text`, with the tokenizer's special prefix (bos) when asked."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Returns the text of `ids`; incomplete or invalid UTF-8 becomes U+FFFD."""

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes | None:
        """Returns the exact bytes of one token, or None when the tokenizer has no byte
        view (then detokenizing goes through `decode` on a window of ids)."""
        return None


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; specials <bos>=256, <eos>=257, <pad>=258, <unk>=259."""

    BOS, EOS, PAD, UNK = 256, 257, 258, 259
    _SPECIAL_NAMES = {BOS: b"<bos>", EOS: b"<eos>", PAD: b"<pad>", UNK: b"<unk>"}

    def __init__(self, vocab_size: int = 260) -> None:
        # a model without tokenizer.json may have more ids than bytes and specials: those
        # extra ids have no text and decode like specials
        self.vocab_size = max(vocab_size, 260)
        self.bos_token_id = self.BOS
        self.eos_token_ids = [self.EOS]
        self.pad_token_id = self.PAD

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Returns [<bos>] (when add_special_tokens) followed by the UTF-8 bytes of text."""
        ids = list(text.encode("utf-8"))
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Returns the UTF-8 text of the byte ids; specials are dropped or written as
        `<bos>` etc. Raises ValueError for an id outside the vocabulary."""
        data = b"".join(self.token_bytes(i, skip_special_tokens) for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """Returns the byte of a byte id, and b"" or the name of a special.
        Raises ValueError for an id outside the vocabulary."""
        token_id = int(token_id)
        if 0 <= token_id < 256:
            return bytes((token_id,))
        if token_id in self._SPECIAL_NAMES:
            return b"" if skip_special_tokens else self._SPECIAL_NAMES[token_id]
        if 260 <= token_id < self.vocab_size:
            return b"" if skip_special_tokens else f"<{token_id}>".encode()
        raise ValueError(f"token id {token_id} outside the byte vocabulary [0, {self.vocab_size})")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a HF `tokenizer.json`) with the bos/eos of its folder."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), add_bos: bool = False) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None  # prepend bos if tokenizer.json does not

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """Reads `tokenizer.json` and, when present, `tokenizer_config.json` (bos_token,
        eos_token, add_bos_token). Raises FileNotFoundError without tokenizer.json,
        ValueError when a named bos/eos token is not in the vocabulary."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        conf_path = folder / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        bos = _token_id(tok, conf.get("bos_token"), "bos_token")
        eos = _token_id(tok, conf.get("eos_token"), "eos_token")
        out = cls(tok, bos, [] if eos is None else [eos], bool(conf.get("add_bos_token", False)))
        out.chat_template = _chat_template(folder, conf)
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Returns the ids of text; with add_special_tokens, tokenizer.json's post-processor
        runs and bos is prepended when the folder asks for it and it is not there yet."""
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Returns the text of ids through tokenizer.json's decoder."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _token_id(tok: tokenizers.Tokenizer, token: str | dict | None, what: str) -> int | None:
    # tokenizer_config.json writes a token as a string or as a serialized AddedToken
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{what} {token!r} of tokenizer_config.json is not in tokenizer.json")
    return token_id


class IncrementalDetokenizer:
    """Text of a stream of generated ids, released as soon as it can no longer change.

    The concatenation of all `push` results and `flush()` equals
    `tokenizer.decode(all_ids, skip_special_tokens)`. Tokenizers with a byte view
    (`token_bytes`) go through an incremental UTF-8 decoder and are always exact. Others
    decode a short window of recent ids each step (O(1) per token): new text is held while
    it ends in U+FFFD (an unfinished character), and the ids released last are decoded
    again as context, for decoders whose output depends on a token's position (e.g. a
    stripped leading space). This is exact for ids that spell valid UTF-8. For invalid
    bytes (garbage, not text) a stream may differ from a full decode: text unfinished for
    more than 16 ids is released as is, and some decoders (ByteFallback) turn a whole run
    of byte tokens into U+FFFDs once one byte in it is bad.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._parts: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._window: list[int] = []  # context ids, then the ids not yet released
        self._num_context = 0  # ids at the head of the window whose text is released
        self._context_len = 0  # len(decode(window[:num_context]))

    @property
    def text(self) -> str:
        """All text released so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token_id: int) -> str:
        """Adds one generated id; returns the text it made final (often "", while a
        multi-byte character is incomplete). Raises ValueError for an id the tokenizer
        does not know (byte view only)."""
        data = self.tokenizer.token_bytes(token_id, self.skip_special_tokens)
        if data is not None:
            return self._emit(self._utf8.decode(data))
        self._window.append(int(token_id))
        text = self._decode(self._window)
        unfinished = len(text) <= self._context_len or text.endswith(_REPLACEMENT)
        if unfinished and len(self._window) - self._num_context <= _MAX_PENDING:
            return ""
        delta = text[self._context_len:]
        self._release()
        return self._emit(delta)

    def flush(self) -> str:
        """Releases whatever is held back (as U+FFFD where unfinished) and returns it."""
        tail = self._utf8.decode(b"", final=True)
        if self._num_context < len(self._window):
            tail += self._decode(self._window)[self._context_len:]
            self._release()
        return self._emit(tail)

    def _release(self) -> None:
        # the ids just released become the context of the next window; older ones go
        self._window = self._window[self._num_context:]
        self._num_context = len(self._window)
        self._context_len = len(self._decode(self._window))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta


def _chat_template(folder: Path, conf: dict) -> str | None:
    # transformers >= 4.47 writes chat_template.jinja; older folders keep it in the config,
    # as a string or as a list of named templates
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = conf.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
