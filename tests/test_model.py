"""The paged model against transformers: same logits (fp32, 1e-4) and same greedy tokens.

Every forward goes through hand-built page tables (block size 4, shuffled block ids), so
the model is checked together with paged attention: one whole prefill, chunked prefill,
and batches mixing decodes of sequences of different lengths with a prefill chunk.
"""

from __future__ import annotations

import pytest
import torch

from agentos.kernel.runner.attention import AttnMeta, PrefillChunk
from agentos.kernel.runner.loader import load_model, save_hf_folder, tiny_hf_config, tiny_hf_weights
from hf_models import hf_generate, hf_logits, make_hf_checkpoint

ATOL = 1e-4

CHECKPOINTS = {
    "llama": dict(kind="llama"),
    "llama_tied": dict(kind="llama", tie=True),
    "llama_bias": dict(kind="llama", bias=True, mlp_bias=True),
    "llama_mha": dict(kind="llama", num_kv_heads=4),
    "llama3_rope": dict(kind="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2": dict(kind="qwen2"),
    "qwen2_yarn": dict(kind="qwen2", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "qwen2_tied": dict(kind="qwen2", tie=True),
    "mistral": dict(kind="mistral"),
    "qwen3": dict(kind="qwen3"),
    # windows shorter than the prompts (19-21 tokens): every path masks old keys
    "mistral_sliding": dict(kind="mistral", sliding_window=6),
    "qwen2_sliding_layers": dict(kind="qwen2", use_sliding_window=True, sliding_window=5,
                                 max_window_layers=1),
    "qwen3_tied": dict(kind="qwen3", tie=True, num_kv_heads=1),
    "sharded": dict(kind="llama", shards=3, seed=1),
}


class Pages:
    """Hand-built page tables over a small KV tensor, handed out in shuffled order so a
    session's blocks are not contiguous (block 0 is used too: decode tables pad with 0)."""

    def __init__(self, cfg, num_blocks: int = 48, block_size: int = 4):
        self.block_size = block_size
        self.kv = torch.zeros(num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads,
                              cfg.head_dim)
        self.free_ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(7))
        self.free_ids = self.free_ids.tolist()
        self.block_ids: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def append(self, seq: str, n: int) -> list[int]:
        """Maps n more tokens of seq; returns their slots."""
        blocks = self.block_ids.setdefault(seq, [])
        start = self.lens.get(seq, 0)
        self.lens[seq] = start + n
        while len(blocks) * self.block_size < start + n:
            blocks.append(self.free_ids.pop())
        return [blocks[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, start + n)]

    def table(self, seq: str) -> torch.Tensor:
        return torch.tensor(self.block_ids[seq], dtype=torch.long)


def run_step(model, pages: Pages, decodes=(), prefills=()) -> torch.Tensor:
    """One batched forward: decodes [(seq, token)] first, then prefill chunks
    [(seq, tokens)]. Returns logits [T, V] for every token of the step, in that order."""
    ids, positions, slots = [], [], []
    for seq, token in decodes:
        positions.append(pages.lens.get(seq, 0))
        slots += pages.append(seq, 1)
        ids.append(token)
    tables = ctx_lens = None
    if decodes:
        width = max(len(pages.block_ids[s]) for s, _ in decodes)
        tables = torch.tensor([pages.block_ids[s] + [0] * (width - len(pages.block_ids[s]))
                               for s, _ in decodes], dtype=torch.long)
        ctx_lens = torch.tensor([pages.lens[s] for s, _ in decodes], dtype=torch.long)
    chunks = []
    for seq, tokens in prefills:
        start = pages.lens.get(seq, 0)
        slots += pages.append(seq, len(tokens))
        chunks.append(PrefillChunk(q_start=len(ids), q_len=len(tokens), ctx_len=pages.lens[seq],
                                   block_table=pages.table(seq)))
        positions += range(start, start + len(tokens))
        ids += tokens
    meta = AttnMeta(slot_mapping=torch.tensor(slots, dtype=torch.long), num_decodes=len(decodes),
                    decode_block_tables=tables, decode_ctx_lens=ctx_lens, prefills=chunks)
    return model(torch.tensor(ids), torch.tensor(positions), meta, pages.kv,
                 torch.arange(len(ids)))


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=[*CHECKPOINTS, "tiny"])
def loaded(request, tmp_path_factory):
    """(our model, its config, the folder transformers reads) for each checkpoint kind."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny":
        save_hf_folder(folder, tiny_hf_config(), tiny_hf_weights())
        model, cfg, _ = load_model("tiny")
    else:
        make_hf_checkpoint(folder, **CHECKPOINTS[request.param])
        model, cfg, _ = load_model(str(folder))
    return model, cfg, folder


def test_prefill_matches_hf(loaded):
    model, cfg, folder = loaded
    prompt = tokens(19, seed=1, vocab=cfg.vocab_size)
    logits = run_step(model, Pages(cfg), prefills=[("a", prompt)])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hf_logits(folder, prompt), atol=ATOL, rtol=0)


def test_dense_logits_match_hf(loaded):
    """The trainer's view (a plain causal forward, no KV cache) of every model shape."""
    model, cfg, folder = loaded
    prompt = tokens(17, seed=6, vocab=cfg.vocab_size)
    with torch.no_grad():
        logits = model.dense_logits(torch.tensor(prompt))
    torch.testing.assert_close(logits, hf_logits(folder, prompt), atol=ATOL, rtol=0)


def test_chunked_prefill_matches_hf(loaded):
    model, cfg, folder = loaded
    prompt = tokens(21, seed=2, vocab=cfg.vocab_size)
    pages = Pages(cfg)
    # chunk edges fall inside blocks, so a chunk writes into a block the last one started
    parts = [run_step(model, pages, prefills=[("a", prompt[a:b])])
             for a, b in [(0, 7), (7, 13), (13, 21)]]
    torch.testing.assert_close(torch.cat(parts), hf_logits(folder, prompt), atol=ATOL, rtol=0)


def test_batched_decode_matches_hf(loaded):
    model, cfg, folder = loaded
    seqs = {"a": tokens(8, 3, cfg.vocab_size), "b": tokens(14, 4, cfg.vocab_size),
            "c": tokens(21, 5, cfg.vocab_size)}
    want = {s: hf_logits(folder, ids) for s, ids in seqs.items()}
    got: dict[str, list[torch.Tensor]] = {s: [] for s in seqs}
    pages = Pages(cfg)

    def record(logits, order):
        for rows, (seq, _) in zip(logits.split([n for _, n in order]), order):
            got[seq].append(rows)

    # step 1: three prefills (c only partly); step 2: decodes of a, b with c's second chunk
    record(run_step(model, pages, prefills=[("a", seqs["a"][:5]), ("b", seqs["b"][:11]),
                                            ("c", seqs["c"][:9])]), [("a", 5), ("b", 11), ("c", 9)])
    record(run_step(model, pages, decodes=[("a", seqs["a"][5]), ("b", seqs["b"][11])],
                    prefills=[("c", seqs["c"][9:17])]), [("a", 1), ("b", 1), ("c", 8)])
    # then decode steps of the batch until every sequence is done (a and b drop out first)
    while True:
        batch = [(s, ids[pages.lens[s]]) for s, ids in seqs.items() if pages.lens[s] < len(ids)]
        if not batch:
            break
        record(run_step(model, pages, decodes=batch), [(s, 1) for s, _ in batch])
    for seq in seqs:
        torch.testing.assert_close(torch.cat(got[seq]), want[seq], atol=ATOL, rtol=0,
                                   msg=lambda m, seq=seq: f"sequence {seq}: {m}")


def test_greedy_matches_hf_generate(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "gen", "llama", seed=3)
    model, cfg, _ = load_model(str(folder))
    prompt = tokens(9, seed=6, vocab=cfg.vocab_size)
    want = hf_generate(folder, prompt, 64)
    assert len(want) == 64 and len(set(want)) > 5  # a test of something, not of one loop
    pages = Pages(cfg, num_blocks=24)
    logits = run_step(model, pages, prefills=[("a", prompt)])[-1:]
    got = []
    for _ in range(64):
        got.append(int(logits[0].argmax()))
        logits = run_step(model, pages, decodes=[("a", got[-1])])
    assert got == want


def test_tiny_folder_loads_same_weights(tmp_path):
    folder = save_hf_folder(tmp_path / "tiny", tiny_hf_config(), tiny_hf_weights())
    a, cfg_a, tok_a = load_model("tiny")
    b, cfg_b, tok_b = load_model(str(folder))
    assert cfg_a == cfg_b
    assert type(tok_a) is type(tok_b)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("fused", [True, False])
def test_cascade_decode_equals_per_session_attention(fused, monkeypatch):
    """Decodes that share leading blocks attend to them once (cascade); the result equals
    attending to each session's whole table. Both the fused CPU kernel and the plain torch
    path of attention with log-sum-exp."""
    import numpy as np

    from agentos.kernel.runner import attention

    if not fused:
        monkeypatch.setattr(attention, "_FLASH_CPU", None)

    from agentos.kernel.runner.attention import paged_attention
    from agentos.kernel.runner.model_runner import shared_prefixes

    torch.manual_seed(0)
    bs, kvh, hd, h = 4, 2, 8, 4
    k_cache, v_cache = torch.randn(64, bs, kvh, hd), torch.randn(64, bs, kvh, hd)
    common = [3, 9, 4, 20, 21]
    tables = [np.array(common + [30]), np.array(common + [31, 32]), np.array(common[:4] + [40]),
              np.array([50, 51, 52, 53, 54]), np.array(common + [33])]
    lens = [22, 27, 17, 19, 21]
    groups = shared_prefixes(tables, lens, bs, min_blocks=2)
    # rows 0, 1, 2, 4 start at block 3; row 2 ends within block 4, so 4 common full blocks
    assert [(rows, p.tolist()) for rows, p in groups] == [([0, 1, 2, 4], common[:4])]
    q = torch.randn(len(tables), h, hd)

    def meta(tabs, ctx, shared=()):
        width = max(len(t) for t in tabs)
        padded = torch.zeros(len(tabs), width, dtype=torch.long)
        for i, t in enumerate(tabs):
            padded[i, : len(t)] = torch.as_tensor(t)
        return AttnMeta(slot_mapping=torch.zeros(len(tabs), dtype=torch.long),
                        num_decodes=len(tabs), decode_block_tables=padded,
                        decode_ctx_lens=torch.tensor(ctx), shared=list(shared))

    plain = paged_attention(q, k_cache, v_cache, meta(tables, lens), 0.3)
    from agentos.kernel.runner.attention import SharedPrefix

    rows, prefix = groups[0]
    start = [len(prefix) if i in rows else 0 for i in range(len(tables))]
    cascade = paged_attention(q, k_cache, v_cache, meta(
        [t[a:] for t, a in zip(tables, start)], [n - a * bs for n, a in zip(lens, start)],
        [SharedPrefix(torch.tensor(rows), torch.as_tensor(prefix))]), 0.3)
    assert torch.allclose(cascade, plain, atol=1e-5)
    # a prefix shared by the whole batch takes the path without row indexing
    everyone = [t for i, t in enumerate(tables) if i in rows]
    sub = [lens[i] for i in rows]
    plain = paged_attention(q[rows], k_cache, v_cache, meta(everyone, sub), 0.3)
    cascade = paged_attention(q[rows], k_cache, v_cache, meta(
        [t[4:] for t in everyone], [n - 4 * bs for n in sub],
        [SharedPrefix(torch.arange(4), torch.as_tensor(prefix))]), 0.3)
    assert torch.allclose(cascade, plain, atol=1e-5)


@pytest.mark.parametrize("cap,window", [(None, None), (5.0, None), (None, 4)])
def test_fresh_prefill_runs_equal_attention_over_the_cache(cap, window):
    """Prefill chunks whose whole context is new attend to the step's own K/V, and
    consecutive chunks of one length and context length attend in one call; the result
    equals each chunk attending over the paged cache on its own."""
    from agentos.kernel.runner.attention import PrefillChunk, _runs, paged_attention, write_kv

    torch.manual_seed(0)
    bs, kvh, hd, h, num_blocks = 4, 2, 8, 6, 64
    k_cache, v_cache = torch.zeros(num_blocks, bs, kvh, hd), torch.zeros(num_blocks, bs, kvh, hd)
    # (new tokens, cached before): three fresh chunks of 6, one that continues 5 cached
    # tokens, then fresh ones of 6 and 3 (the 3 ends the run of 6), then three that each
    # continue 2 cached tokens with 5 new ones
    shape = [(6, 0), (6, 0), (6, 0), (4, 5), (6, 0), (3, 0), (5, 2), (5, 2), (5, 2)]
    free = iter(torch.randperm(num_blocks).tolist())
    chunks, slots, start = [], [], 0
    for n, cached in shape:
        ctx = cached + n
        table = torch.tensor([next(free) for _ in range(-(-ctx // bs))])
        for pos in range(cached):  # the context cached by an earlier step
            b, o = table[pos // bs], pos % bs
            k_cache[b, o], v_cache[b, o] = torch.randn(kvh, hd), torch.randn(kvh, hd)
        slots += [int(table[p // bs]) * bs + p % bs for p in range(cached, ctx)]
        chunks.append(PrefillChunk(start, n, ctx, table))
        start += n
    q, k, v = torch.randn(start, h, hd), torch.randn(start, kvh, hd), torch.randn(start, kvh, hd)
    meta = AttnMeta(slot_mapping=torch.tensor(slots), num_decodes=0, prefills=chunks)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    from_cache = paged_attention(q, k_cache, v_cache, meta, 0.3, window, cap)
    assert [len(r) for r in _runs(chunks)] == [3, 1, 1, 1, 3]
    direct = paged_attention(q, k_cache, v_cache, meta, 0.3, window, cap, k=k, v=v)
    one_by_one = torch.cat([paged_attention(
        q[c.q_start : c.q_start + c.q_len], k_cache, v_cache,
        AttnMeta(slot_mapping=meta.slot_mapping, num_decodes=0,
                 prefills=[PrefillChunk(0, c.q_len, c.ctx_len, c.block_table)]), 0.3, window, cap)
        for c in chunks])
    assert torch.allclose(direct, one_by_one, atol=1e-6)
    assert torch.allclose(from_cache, one_by_one, atol=1e-6)
    # and each chunk as written out: every query head over its kv head's keys up to its
    # own position (within the window), scores soft-capped, softmax, values
    for c in chunks:
        pos = torch.arange(c.ctx_len)
        keys = k_cache[c.block_table[pos // bs], pos % bs].repeat_interleave(h // kvh, dim=1)
        vals = v_cache[c.block_table[pos // bs], pos % bs].repeat_interleave(h // kvh, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[c.q_start : c.q_start + c.q_len], keys) * 0.3
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        at = (pos[:, None] + c.ctx_len - c.q_len)[: c.q_len]  # each query's position
        visible = pos[None, :] <= at
        if window is not None:
            visible &= pos[None, :] > at - window
        want = torch.einsum("hqk,khd->qhd",
                            s.masked_fill(~visible, float("-inf")).softmax(-1), vals)
        assert torch.allclose(one_by_one[c.q_start : c.q_start + c.q_len], want, atol=1e-5)
