"""llama.cpp as a peer of the CPU benchmarks: the same random weights, decoded by both.

`make_checkpoint` writes a small random Llama checkpoint that AgentOS, transformers and
llama.cpp's converter all read; `to_gguf` converts it to an f32 GGUF with llama.cpp's own
`convert_hf_to_gguf.py`; `decode` times llama.cpp's greedy single-sequence decode and
`seq_copy_us` its KV-cache sequence copy (the counterpart of a session fork + close).

Install (llama-cpp-python has no wheel for this platform; pip builds llama.cpp from
source for this CPU, about 5 minutes on 2 cores; needs cmake and a C/C++ compiler):

    pip install llama-cpp-python==0.3.36 sentencepiece

The converter is not in the installed package; it ships in the source distribution:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d ~/.cache/agentos
    tar xzf ~/.cache/agentos/llama_cpp_python-0.3.36.tar.gz -C ~/.cache/agentos
    # found there; or point at any llama.cpp checkout (the file or its folder):
    export AGENTOS_LLAMA_CPP_CONVERTER=/path/to/llama.cpp/convert_hf_to_gguf.py

It runs under this Python and imports torch, numpy, transformers and sentencepiece; its own
`gguf-py` lies beside it, so the PyPI `gguf` package is not needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONVERTER_ENV = "AGENTOS_LLAMA_CPP_CONVERTER"
# where the install steps above unpack the sdist; any llama_cpp_python-*/ version there
SDIST_DIR = Path.home() / ".cache" / "agentos"
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_NEEDS = ("sentencepiece", "transformers", "torch", "numpy")  # modules it imports
INSTALL_HINT = "pip install llama-cpp-python; it builds from source in about 5 minutes"

# the shape of the engine's `tiny` model (kernel/runner/loader.py), so timings compare
TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=32, vocab_size=512, tie_word_embeddings=True,
    max_position_embeddings=32768,
)
UNK, BOS, EOS = 0, 1, 2  # Llama-2's special ids: <unk>, <s>, </s>, then 256 byte tokens
WEIGHT_STD = 0.1  # NOTE: wider than an init's 0.02 so greedy argmaxes are not near-ties


def missing() -> str | None:
    """None when llama_cpp imports and the converter is found; else a one-line reason."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed ({INSTALL_HINT})"
    if find_converter() is None:
        return (f"llama.cpp's {CONVERTER} was not found: set {CONVERTER_ENV} or unpack the "
                f"llama-cpp-python sdist into {SDIST_DIR} (see agentos/bench/llamacpp.py)")
    # NOTE: the converter imports sentencepiece for every Llama, even from tokenizer.json
    lacking = [m for m in CONVERTER_NEEDS if importlib.util.find_spec(m) is None]
    if lacking:
        return f"llama.cpp's converter needs: pip install {' '.join(lacking)}"
    return None


def find_converter() -> Path | None:
    """Returns llama.cpp's convert_hf_to_gguf.py, looked up in this order: the file (or a
    llama.cpp folder holding it) named by $AGENTOS_LLAMA_CPP_CONVERTER; a source checkout
    of llama-cpp-python the installed package runs from (vendor/llama.cpp); an unpacked
    llama-cpp-python sdist in ~/.cache/agentos, the newest first. None when none exists."""
    candidates: list[Path] = []
    if env := os.environ.get(CONVERTER_ENV):
        path = Path(env).expanduser()
        candidates.append(path / CONVERTER if path.is_dir() else path)
    try:
        import llama_cpp

        candidates.append(Path(llama_cpp.__file__).parent.parent / "vendor" / "llama.cpp"
                          / CONVERTER)
    except ImportError:
        pass
    candidates += sorted(SDIST_DIR.glob(f"llama_cpp_python-*/vendor/llama.cpp/{CONVERTER}"),
                         reverse=True)
    return next((p for p in candidates if p.is_file()), None)


def to_gguf(hf_folder: str, out_path: str) -> str:
    """Converts the Hugging Face Llama checkpoint in hf_folder (config.json, safetensors,
    tokenizer.json) to an f32 GGUF at out_path with llama.cpp's converter, run as a
    subprocess of this Python. Returns out_path. Raises FileNotFoundError when the converter
    is not found, RuntimeError (with the converter's output) when it fails."""
    converter = find_converter()
    if converter is None:
        raise FileNotFoundError(missing() or f"{CONVERTER} not found")
    cmd = [sys.executable, str(converter), str(hf_folder), "--outfile", str(out_path),
           "--outtype", "f32"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not Path(out_path).is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return out_path


def make_checkpoint(folder: str, seed: int = 0, **shape: Any) -> str:
    """Writes a random-weight Llama checkpoint (transformers `save_pretrained`, fp32) with a
    Llama-2 style tokenizer into folder and returns it. shape overrides TINY_SHAPE (any
    LlamaConfig field); weights are normal(0, WEIGHT_STD) from a generator seeded seed, norm
    weights 1. The tokenizer (see `make_tokenizer`) has exactly vocab_size ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    config = LlamaConfig(**{**TINY_SHAPE, **shape}, bos_token_id=BOS, eos_token_id=EOS,
                         rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * WEIGHT_STD
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else noise)
    model.save_pretrained(folder)
    make_tokenizer(folder, config.vocab_size, seed)
    return folder


def make_tokenizer(folder: str, vocab_size: int, seed: int = 0) -> None:
    """Writes tokenizer.json and tokenizer_config.json: a Llama-2 style BPE (words marked
    with "▁", byte fallback) with ids <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then
    merges trained on generated pseudo-words up to exactly vocab_size ids.

    NOTE: a tokenizer.json that all three readers take: llama.cpp's converter reads it as
    `LlamaHfVocab` (tokenizer model "llama", so no BPE pre-tokenizer hash to match and no
    tokenizer.model), transformers as a fast tokenizer and the engine's loader through
    `tokenizers`. The GGUF's token scores are all -1000, so llama.cpp's own text
    tokenization may differ from this one; ids are what the benchmarks pass. Raises
    ValueError when vocab_size < 260 or the generated text gives too few merges."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (3 specials, 256 bytes), got {vocab_size}")
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    # the most frequent characters that fit; the rest are spelled with byte tokens
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                  limit_alphabet=vocab_size - 259, show_progress=False)
    tok.train_from_iterator(_pseudo_text(seed), trainer)
    spec = json.loads(tok.to_str())
    learned = spec["model"]["vocab"]
    if len(learned) != vocab_size - 256:
        raise ValueError(f"the generated text gave {len(learned) + 256} ids, not {vocab_size}")
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({s: 256 + i for s, i in learned.items() if s not in vocab})
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, s in enumerate(specials)]
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    out = Path(folder)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _pseudo_text(seed: int, num_lines: int = 4000) -> list[str]:
    # words of 1-4 consonant-vowel syllables: enough distinct pairs for thousands of merges
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(2000)]
    return [" ".join(rng.choices(words, k=12)) + rng.choice(".,!?") for _ in range(num_lines)]


def decode(gguf_path: str, prompt: list[int], new_tokens: int, repeats: int = 3,
           threads: int | None = None) -> dict:
    """Times llama.cpp's greedy decode of one sequence, in a fresh Python process (see
    `_in_child`), after one untimed warm-up run. Per run the KV cache is cleared, the
    prompt ids are evaluated as one batch (prefill, giving the first new token) and the
    other new_tokens - 1 tokens are decoded one at a time (eval of the last token, argmax
    of its logits). No BOS is added: prompt is taken as is.

    Returns {"tok_s": median decode tokens/s (new_tokens - 1 steps over their time, prefill
    excluded), "prefill_s": median prefill seconds, "tokens": the new_tokens greedy ids,
    "threads": the thread count used}. threads: llama.cpp threads for both prefill and
    decode; None uses os.cpu_count(). Raises ValueError for bad arguments, RuntimeError
    (with the child's output) when the measurement fails."""
    if not prompt or new_tokens < 2 or repeats < 1 or (threads is not None and threads < 1):
        raise ValueError("prompt must be non-empty, new_tokens >= 2, repeats and threads >= 1")
    return _in_child({"measure": "decode", "gguf_path": gguf_path, "prompt": prompt,
                      "new_tokens": new_tokens, "repeats": repeats,
                      "threads": threads or os.cpu_count() or 1})


def seq_copy_us(gguf_path: str, n_tokens: int, repeats: int) -> float:
    """Median microseconds of copying a sequence of n_tokens cached tokens to a second
    sequence (llama_memory_seq_cp) and removing the copy (llama_memory_seq_rm): llama.cpp's
    counterpart of a session fork + close, timed from Python in a fresh process. The
    context holds 2 sequences in one unified KV cache (kv_unified) of n_tokens cells
    (rounded up to 256), where a copy tags the cells with the second sequence id (no data
    is copied, as a fork shares blocks); the cached ids are 0..n_tokens-1 (mod the
    vocabulary). Raises ValueError for bad arguments, RuntimeError when it fails."""
    if n_tokens < 1 or repeats < 1:
        raise ValueError("n_tokens and repeats must be >= 1")
    return _in_child({"measure": "seq_copy_us", "gguf_path": gguf_path,
                      "n_tokens": n_tokens, "repeats": repeats})


def append_turn(gguf_path: str, context: list[int], chunks: list[list[int]],
                threads: int | None = None) -> dict:
    """An agent's turn after a long context, by llama.cpp in a fresh process: `context` is
    evaluated once; then for each chunk (after one untimed warm-up with the first), the
    chunk is evaluated after the context and the argmax of its last logits taken (a tool
    output appended, then the first new token), and its cells removed again
    (llama_memory_seq_rm), so every chunk continues the same context.

    Returns {"s": [seconds of each chunk], "tokens": [each chunk's first token],
    "threads": the thread count}. Raises ValueError for bad arguments, RuntimeError when
    the measurement fails."""
    if not context or not chunks or not all(chunks) or (threads is not None and threads < 1):
        raise ValueError("context and every chunk must be non-empty, threads >= 1")
    return _in_child({"measure": "append_turn", "gguf_path": gguf_path, "context": context,
                      "chunks": chunks, "threads": threads or os.cpu_count() or 1})


def _in_child(request: dict) -> Any:
    # NOTE: llama.cpp runs in its own process because in this one it would share torch's
    # OpenMP runtime (libgomp.so.1 is loaded once per process). Its barriers stop spinning
    # and sleep once all thread teams together outnumber the cores, so with the engine's
    # loop thread holding a torch team, llama.cpp decoded 3-4x slower at threads = cores,
    # and the engine slowed too after llama.cpp's team was made.
    root = str(Path(__file__).resolve().parents[2])  # where `agentos` imports from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "agentos.bench.llamacpp"]
    done = subprocess.run(cmd, input=json.dumps(request), capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp {request['measure']} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    """The child of `_in_child`: reads one request as JSON on stdin and prints the result
    as one JSON line."""
    r = json.loads(sys.stdin.read())
    if r["measure"] == "decode":
        out: Any = _decode(r["gguf_path"], r["prompt"], r["new_tokens"], r["repeats"],
                           r["threads"])
    elif r["measure"] == "seq_copy_us":
        out = _seq_copy_us(r["gguf_path"], r["n_tokens"], r["repeats"])
    elif r["measure"] == "append_turn":
        out = _append_turn(r["gguf_path"], r["context"], r["chunks"], r["threads"])
    else:
        raise ValueError(f"unknown measure {r['measure']!r}")
    print(json.dumps(out))


def _decode(gguf_path: str, prompt: list[int], new_tokens: int, repeats: int,
            threads: int) -> dict:
    llm = _load(gguf_path, len(prompt) + new_tokens, threads)
    try:
        tokens, _, _ = _greedy(llm, prompt, new_tokens)  # warm-up
        runs = [_greedy(llm, prompt, new_tokens) for _ in range(repeats)]
    finally:
        llm.close()
    return {"tok_s": statistics.median((new_tokens - 1) / s for _, _, s in runs),
            "prefill_s": statistics.median(s for _, s, _ in runs), "tokens": tokens,
            "threads": threads}


def _append_turn(gguf_path: str, context: list[int], chunks: list[list[int]],
                 threads: int) -> dict:
    import llama_cpp

    n = len(context)
    llm = _load(gguf_path, n + max(len(c) for c in chunks), threads)
    try:
        mem = llama_cpp.llama_get_memory(llm.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        ids = (llama_cpp.llama_token * n)(*context)  # NOTE: alive while the batch points at it
        if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(ids, n)) != 0:
            raise RuntimeError("llama_decode of the context failed")
        n_vocab = llm.n_vocab()
        times, tokens = [], []
        for i, chunk in enumerate([chunks[0], *chunks]):  # the first run warms up
            ids = (llama_cpp.llama_token * len(chunk))(*chunk)
            t0 = time.perf_counter()
            token = _step(llm.ctx, ids, len(chunk), n_vocab)
            seconds = time.perf_counter() - t0
            if not llama_cpp.llama_memory_seq_rm(mem, 0, n, -1):
                raise RuntimeError("llama_memory_seq_rm failed")
            if i:
                times.append(seconds)
                tokens.append(token)
    finally:
        llm.close()
    return {"s": times, "tokens": tokens, "threads": threads}


def _seq_copy_us(gguf_path: str, n_tokens: int, repeats: int) -> float:
    import llama_cpp

    llm = _load(gguf_path, 1, threads=os.cpu_count() or 1)  # its own context stays unused
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = max(n_tokens, 256)
    params.n_ubatch = min(params.n_ctx, 512)
    params.n_seq_max, params.kv_unified = 2, True
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    try:
        if ctx is None:
            raise RuntimeError("llama_init_from_model failed")
        n_vocab = llm.n_vocab()
        ids = (llama_cpp.llama_token * n_tokens)(*(i % n_vocab for i in range(n_tokens)))
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, n_tokens)) != 0:
            raise RuntimeError("llama_decode of the prompt failed")
        mem = llama_cpp.llama_get_memory(ctx)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llama_cpp.llama_memory_seq_cp(mem, 0, 1, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, 1, -1, -1)
            times.append(time.perf_counter() - t0)
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, -1, -1)
        if llama_cpp.llama_memory_seq_pos_max(mem, 1) != n_tokens - 1:
            raise RuntimeError("llama_memory_seq_cp did not copy the sequence")
    finally:
        if ctx is not None:
            llama_cpp.llama_free(ctx)
        llm.close()
    return statistics.median(times) * 1e6


def _load(gguf_path: str, n_ctx: int, threads: int) -> Any:
    # a Llama with one context of n_ctx tokens (at least 256) that takes a whole prompt in
    # one batch; logits of the batch's last token only
    from llama_cpp import Llama

    n_ctx = max(n_ctx, 256)
    return Llama(gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                 n_threads=threads, n_threads_batch=threads, logits_all=False,
                 verbose=False)


def _greedy(llm: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    # one greedy run from an empty cache: (tokens, prefill seconds, decode seconds)
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    prompt_ids = (llama_cpp.llama_token * len(prompt))(*prompt)
    step_ids = (llama_cpp.llama_token * 1)()
    n_vocab = llm.n_vocab()
    t0 = time.perf_counter()
    tokens = [_step(llm.ctx, prompt_ids, len(prompt), n_vocab)]
    t1 = time.perf_counter()
    while len(tokens) < new_tokens:
        step_ids[0] = tokens[-1]
        tokens.append(_step(llm.ctx, step_ids, 1, n_vocab))
    return tokens, t1 - t0, time.perf_counter() - t1


def _step(ctx: Any, ids: Any, n: int, n_vocab: int) -> int:
    # evaluates ids[:n] after the cached tokens; returns the argmax of the last logits
    import llama_cpp
    import numpy as np

    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, n)) != 0:
        raise RuntimeError("llama_decode failed")
    logits = llama_cpp.llama_get_logits_ith(ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())


if __name__ == "__main__":
    main()
