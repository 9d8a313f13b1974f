"""Gemma and Gemma 2 against transformers: the same logits (fp32, 1e-4) through the paged
forward and the dense forward, the same greedy tokens through the engine (batched chunked
prefill, deterministic mode, shared prefixes), and soft-capped attention on every path:
torch, batch-invariant, cascade, and the Triton kernels under Triton's interpreter.

The shapes are ones the other model tests do not use: hidden 48 with head_dim 32 (the
heads are wider than hidden_size / num_heads), an attention scale that is not head_dim's,
soft-caps small enough to bend most scores, windows shorter than the prompts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import test_model
import torch
from test_model import Pages, run_step, tokens

from agentos import Engine
from agentos.kernel.runner import attention
from agentos.kernel.runner.loader import hf_model_config, load_model
from hf_models import batched_greedy_matches_hf, hf_generate, hf_logits, hf_model, make_hf_checkpoint

ATOL = 1e-4
SHAPE = dict(hidden_size=48, head_dim=32, intermediate_size=96)

CHECKPOINTS = {
    # GQA 4/2, tied embeddings
    "gemma": dict(kind="gemma", tie=True, **SHAPE),
    # one KV head, q/k/v/o bias, an untied output projection
    "gemma_mqa_bias": dict(kind="gemma", num_kv_heads=1, bias=True, seed=4, **SHAPE),
    # the default layer types (sliding, full, sliding) with a window of 6, both soft-caps
    # small enough to bend most scores and logits, scale 24 ** -0.5 instead of 32 ** -0.5
    "gemma2": dict(kind="gemma2", sliding_window=6, query_pre_attn_scalar=24,
                   attn_logit_softcapping=1.0, final_logit_softcapping=2.0, seed=2, **SHAPE),
    # explicit layer types (full first), window 5, no soft-caps, one KV head, tied
    "gemma2_no_caps": dict(kind="gemma2", tie=True, num_kv_heads=1, sliding_window=5,
                           layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                           attn_logit_softcapping=None, final_logit_softcapping=None, seed=3,
                           **SHAPE),
}
# NOTE: the engine tests use untied checkpoints: with tied embeddings scaled by
# sqrt(hidden_size), random small models mostly repeat their input token, a weak test


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    """(our model, its config, the folder transformers reads) for each checkpoint."""
    folder = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CHECKPOINTS[request.param])
    model, cfg, _ = load_model(str(folder))
    return model, cfg, folder


# the parity checks every family runs (prefill, dense, chunked prefill, batched decode),
# here on this file's checkpoints (its `loaded`)
test_prefill_matches_hf = test_model.test_prefill_matches_hf
test_dense_logits_match_hf = test_model.test_dense_logits_match_hf
test_chunked_prefill_matches_hf = test_model.test_chunked_prefill_matches_hf
test_batched_decode_matches_hf = test_model.test_batched_decode_matches_hf


def test_config_matches_transformers(loaded):
    _, cfg, folder = loaded
    hf = hf_model(str(folder))
    layers = hf.model.layers
    assert cfg.layer_windows == [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    assert cfg.tie_word_embeddings == (hf.lm_head.weight is hf.model.embed_tokens.weight)
    a = layers[0].self_attn
    assert (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5 == a.scaling
    assert cfg.attn_logit_softcap == getattr(a, "attn_logit_softcapping", None)
    assert cfg.final_logit_softcap == getattr(hf.config, "final_logit_softcapping", None)


def test_deterministic_paths_match_hf(loaded):
    """The batch-invariant kernels (deterministic mode) give the same logits, paged (in
    chunks) and dense."""
    from agentos.kernel.runner.batch_invariant import make_batch_invariant

    _, cfg, folder = loaded
    model, _, _ = load_model(str(folder))  # a copy: make_batch_invariant changes it
    make_batch_invariant(model)

    def deterministic(ids, positions, meta, kv, logits_indices):
        return model(ids, positions, dataclasses.replace(meta, deterministic=True), kv, logits_indices)

    prompt = tokens(21, seed=7, vocab=cfg.vocab_size)
    pages = Pages(cfg)
    logits = [run_step(deterministic, pages, prefills=[("a", prompt[a:b])])
              for a, b in [(0, 9), (9, 20), (20, 21)]]
    want = hf_logits(folder, prompt)
    torch.testing.assert_close(torch.cat(logits), want, atol=ATOL, rtol=0)
    with torch.no_grad():
        dense = model.dense_logits(torch.tensor(prompt))
    torch.testing.assert_close(dense, want, atol=ATOL, rtol=0)


# -- configs ------------------------------------------------------------------------------


def config(kind: str, **fields) -> dict:
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, model_type=kind)
    return {**base, **fields}


def test_missing_keys_take_transformers_gemma_defaults():
    from agentos.kernel.runner.model import _embed_scale

    assert _embed_scale(3072, torch.bfloat16) == 55.5  # sqrt(3072) rounded as transformers does
    cfg = hf_model_config(config("gemma", hidden_act="gelu"))
    # NOTE: transformers reads Gemma's legacy "gelu" as the tanh approximation
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.norm_plus_one and not cfg.sandwich_norms
    assert cfg.tie_word_embeddings and cfg.head_dim == 256 and cfg.max_position_embeddings == 8192
    assert cfg.layer_windows == [None] * 4 and cfg.attn_logit_softcap is None
    cfg = hf_model_config(config("gemma2", hidden_act="silu"))  # Gemma 2 reads hidden_activation
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.sandwich_norms
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.final_logit_softcap) == (256, 50, 30)
    assert cfg.layer_windows == [4096, None, 4096, None] and cfg.tie_word_embeddings
    cfg = hf_model_config(config("gemma2", sliding_window=None, attn_logit_softcapping=None,
                                 layer_types=["full_attention"] * 4, tie_word_embeddings=False))
    assert cfg.layer_windows == [None] * 4 and cfg.attn_logit_softcap is None
    assert not cfg.tie_word_embeddings
    cfg = hf_model_config({**config("gemma"), "model_type": None,
                           "architectures": ["Gemma2ForCausalLM"]})
    assert cfg.model_type == "gemma2"


@pytest.mark.parametrize("fields, match", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(attn_logit_softcapping=0.0), "attn_logit_softcapping"),
    (dict(final_logit_softcapping=-30.0), "final_logit_softcapping"),
    (dict(query_pre_attn_scalar="x"), "malformed"),
    (dict(layer_types=["full_attention"] * 3), "layer_types"),
])
def test_bad_gemma2_configs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        hf_model_config(config("gemma2", **fields))


def test_unsupported_family_names_gemma():
    with pytest.raises(ValueError, match="gemma, gemma2"):
        hf_model_config(config("gemma3_text"))


# -- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma_mqa_bias", "gemma2"])
def test_batched_chunked_greedy_matches_transformers(tmp_path, name):
    path = make_hf_checkpoint(tmp_path / name, **CHECKPOINTS[name])
    for _, gen in batched_greedy_matches_hf(path, (5, 23, 40), 32, kv_blocks=256):
        assert len(set(gen.tokens)) > 5  # a test of something, not of one loop

def test_deterministic_mode_is_batch_invariant(tmp_path):
    """Gemma 2 (soft-caps, sliding layers) in deterministic mode: a session alone equals it
    inside a batch bit for bit, greedy equals transformers, and the dense forward
    reproduces the engine's logprobs exactly."""
    path = make_hf_checkpoint(tmp_path / "m", **CHECKPOINTS["gemma2"])
    prompts = [tokens(27, 8, 320), tokens(11, 9, 320), tokens(40, 10, 320)]
    with Engine(str(path), kv_blocks=256, block_size=4, deterministic=True,
                max_batch_tokens=32) as engine:
        sessions = [engine.create_session(tokens=p) for p in prompts]
        with ThreadPoolExecutor(3) as pool:
            gens = list(pool.map(lambda s: s.generate(max_tokens=16, temperature=0.0,
                                                      ignore_eos=True), sessions))
        alone = engine.create_session(tokens=prompts[0]).generate(
            max_tokens=16, temperature=0.0, ignore_eos=True)
        ids = prompts[0] + alone.tokens
        with torch.no_grad():
            logits = engine.kernel.model.dense_logits(torch.tensor(ids))
    assert alone.tokens == gens[0].tokens and alone.logprobs == gens[0].logprobs
    for p, gen in zip(prompts, gens):
        assert gen.tokens == hf_generate(path, p, 16)
    lp = torch.log_softmax(logits.float(), -1)[len(prompts[0]) - 1 : -1]
    assert lp.gather(1, torch.tensor(alone.tokens)[:, None])[:, 0].tolist() == alone.logprobs


def test_shared_prefix_decodes_with_soft_caps(tmp_path, monkeypatch):
    """Gemma 2 with no sliding layer lets the engine attend a shared prefix once for all
    its sessions (the cascade), soft-capped; greedy still equals transformers."""
    path = make_hf_checkpoint(tmp_path / "m", "gemma2", attn_logit_softcapping=1.0,
                              layer_types=["full_attention"] * 3, seed=4, **SHAPE)
    cascades = []
    real = attention._decode_cascade
    monkeypatch.setattr(attention, "_decode_cascade",
                        lambda *a, **k: cascades.append(1) or real(*a, **k))
    prompt = tokens(22, 11, 320)
    with Engine(str(path), kv_blocks=128, block_size=4) as engine:
        sessions = [engine.create_session(tokens=prompt) for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            gens = list(pool.map(lambda s: s.generate(max_tokens=12, temperature=0.0,
                                                      ignore_eos=True), sessions))
        engine.check()
    assert cascades
    want = hf_generate(path, prompt, 12)
    assert all(gen.tokens == want for gen in gens)


def test_cascade_with_soft_cap_equals_plain_decode():
    """The torch cascade merges soft-capped parts by log-sum-exp: the same as attending to
    each row's whole table."""
    from test_triton_attention import cascade_case

    pool, q, meta, plain = cascade_case(torch.float32, 2, 16, seed=3)
    want = attention._decode(q, *pool.caches(False), plain, 0.125, None, 0.7)
    got = attention._decode(q, *pool.caches(False), meta, 0.125, None, 0.7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, attention._decode(q, *pool.caches(False), plain, 0.125),
                              atol=1e-3)  # the cap bends these scores


# -- the Triton kernels, under Triton's interpreter ----------------------------------------


def triton_soft_cap_checks() -> None:
    """Soft-capped decode (splits, windows, shared prefixes) and prefill (windows, small
    tiles) in the Triton kernels equal the torch path. Runs under TRITON_INTERPRET=1."""
    from test_triton_attention import (
        PREFILL_SPECS,
        cascade_case,
        close,
        decode_case,
        decode_meta,
        padded,
        prefill_case,
    )

    from agentos.kernel.runner import triton_attention as T

    cap, f32 = 0.7, torch.float32
    for G, window in ((1, None), (4, None), (2, 5)):
        pool, q, tables, ctx = decode_case(G, 16, f32, lens=(1, 9, 37, 70), seed=G)
        ref = attention._decode(q, *pool.caches(False), decode_meta(tables, ctx), 0.125, window, cap)
        for splits, block_n in ((1, 16), (3, 16)):
            out = T.decode(q, *pool.caches(True), tables, ctx, 0.125, num_splits=splits,
                           block_n=block_n, window=window, cap=cap)
            close(out, ref, f32)
    pool, q, meta, plain = cascade_case(f32, 2, 16, seed=5)
    ref = attention._decode(q, *pool.caches(False), plain, 0.125, None, cap)
    close(T.paged_attention(q, *pool.caches(True), meta, 0.125, None, cap), ref, f32)
    for G, window in ((2, None), (1, 6)):
        pool, q, chunks = prefill_case(f32, G, 16, PREFILL_SPECS, seed=G + 10)
        ref = q.new_zeros(q.shape)
        for c in chunks:
            rows = slice(c.q_start, c.q_start + c.q_len)
            ref[rows] = attention._prefill(q[rows], *pool.caches(False), c, 0.125, window, cap)
        tables = padded([c.block_table.tolist() for c in chunks])
        info = torch.tensor([[c.q_start, c.q_len, c.ctx_len] for c in chunks])
        out = T.prefill(q, *pool.caches(True), tables, info, max(c.q_len for c in chunks), 0.125,
                        out=q.new_zeros(q.shape), block_m=16, block_n=16, window=window, cap=cap)
        close(out, ref, f32)


def triton_model_check(folder: str) -> None:
    """The Gemma 2 checkpoint at `folder` (soft-caps, sliding layers) gives the same logits
    on the Triton kernels as on the torch path: prefill chunks, then batched decodes."""
    model, cfg, _ = load_model(folder)
    a, b = tokens(19, 1, cfg.vocab_size), tokens(9, 2, cfg.vocab_size)
    logits = {}
    for backend in ("torch", "triton"):
        attention.BACKEND = backend
        try:
            pages = Pages(cfg)
            logits[backend] = [
                run_step(model, pages, prefills=[("a", a[:11]), ("b", b[:8])]),
                run_step(model, pages, decodes=[("b", b[8])], prefills=[("a", a[11:18])]),
                run_step(model, pages, decodes=[("a", a[18]), ("b", 5)]),
            ]
        finally:
            attention.BACKEND = "auto"
    for want, got in zip(logits["torch"], logits["triton"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_triton_kernels_soft_cap(tmp_path):
    pytest.importorskip("triton")
    folder = make_hf_checkpoint(tmp_path / "m", **CHECKPOINTS["gemma2"])
    env = dict(os.environ, TRITON_INTERPRET="1", AGENTOS_ATTENTION="auto")
    proc = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


if __name__ == "__main__":  # the subprocess of test_triton_kernels_soft_cap
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    triton_soft_cap_checks()
    triton_model_check(sys.argv[1])
