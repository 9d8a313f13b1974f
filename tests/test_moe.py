"""Mixture-of-Experts families (Mixtral, Qwen3-MoE) against transformers: the same logits
(fp32, 1e-4) through the paged forward and the dense forward, the same greedy tokens through
the engine (deterministic mode too), and every expert layout a checkpoint may have on disk
loading the same weights."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import test_model
import torch
from safetensors.torch import load_file, save_file
from test_model import tokens

from agentos import Engine
from agentos.kernel.runner.loader import hf_model_config, load_model
from agentos.kernel.runner.moe import SparseMoE
from hf_models import batched_greedy_matches_hf, hf_generate, hf_logits, hf_model, make_hf_checkpoint

ATOL = 1e-4

CHECKPOINTS = {
    # 4 experts, top-2, narrower than the dense models' MLP
    "mixtral": dict(kind="mixtral", intermediate_size=48),
    # 8 experts, one KV head, tied embeddings, every layer sliding (window shorter than prompts)
    "mixtral_sliding": dict(kind="mixtral", num_local_experts=8, num_kv_heads=1, tie=True,
                            sliding_window=6, seed=1),
    # layer 1 dense (mlp_only_layers), top-2 of 8 renormalized, q/k/v/o bias
    "qwen3_moe_mlp_only": dict(kind="qwen3_moe", num_experts=8, mlp_only_layers=[1],
                               norm_topk_prob=True, attention_bias=True, seed=2),
    # only layer 1 routes (decoder_sparse_step 2), top-3 of 4 not renormalized, stacked
    # experts on disk, every layer sliding (Qwen3-MoE ignores max_window_layers)
    "qwen3_moe_sparse_step": dict(kind="qwen3_moe", num_experts_per_tok=3, decoder_sparse_step=2,
                                  norm_topk_prob=False, stacked_experts=True,
                                  use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                  seed=3),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    """(our model, its config, the folder transformers reads) for each checkpoint."""
    folder = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CHECKPOINTS[request.param])
    model, cfg, _ = load_model(str(folder))
    return model, cfg, folder


# the parity checks every family runs (prefill, dense, chunked prefill, batched decode),
# here on this file's checkpoints (its `loaded`); in batched decode each token's experts
# are computed among a different set of tokens than in transformers
test_prefill_matches_hf = test_model.test_prefill_matches_hf
test_dense_logits_match_hf = test_model.test_dense_logits_match_hf
test_chunked_prefill_matches_hf = test_model.test_chunked_prefill_matches_hf
test_batched_decode_matches_hf = test_model.test_batched_decode_matches_hf


def routed_experts(model, token_ids: list[int]) -> dict[int, set[int]]:
    """The experts the dense forward routes token_ids to, per MoE layer."""
    seen: dict[int, set[int]] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, SparseMoE):
            def keep(moe, args, out, i=i):
                seen.setdefault(i, set()).update(moe.route(args[0])[1].flatten().tolist())
            hooks.append(layer.mlp.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model.dense_logits(torch.tensor(token_ids))
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_config_matches_transformers_layers(loaded):
    model, cfg, folder = loaded
    hf = hf_model(str(folder))
    hf_moe = ["SparseMoeBlock" in type(layer.mlp).__name__ for layer in hf.model.layers]
    assert cfg.moe_layers == hf_moe and any(hf_moe)
    assert [isinstance(layer.mlp, SparseMoE) for layer in model.layers] == hf_moe
    # random routers spread the tokens: more experts than one token's top-k in every layer
    seen = routed_experts(model, tokens(19, seed=1, vocab=cfg.vocab_size))
    assert sorted(seen) == [i for i, moe in enumerate(hf_moe) if moe]
    assert all(len(experts) > cfg.num_experts_per_tok for experts in seen.values()), seen


def test_capturable_forward_equals_sparse_forward(loaded):
    """The path a CUDA graph captures (every expert over every row) gives the sparse path's
    result: the rows not routed to an expert add exact zeros."""
    model, cfg, _ = loaded
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE))
    x = torch.randn(11, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, ids = moe.route(x)
        torch.testing.assert_close(moe.forward_dense(x, weights, ids), moe(x), atol=1e-6, rtol=0)


def test_bf16_matches_hf_bf16(tmp_path):
    """In bf16 too: a token's k expert outputs are summed in fp32 and rounded once, as
    transformers' default experts path does (rounding after each expert drifts by ~0.2)."""
    for kind in ("mixtral", "qwen3_moe"):
        folder = make_hf_checkpoint(tmp_path / kind, kind, seed=9)
        model, cfg, _ = load_model(str(folder), dtype="bfloat16")
        prompt = tokens(40, seed=9, vocab=cfg.vocab_size)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].float()
            got = model.dense_logits(torch.tensor(prompt))
        torch.testing.assert_close(got, want, atol=0.02, rtol=0, msg=lambda m, kind=kind: f"{kind}: {m}")


# -- expert layouts on disk -----------------------------------------------------------------


def split_experts(stacked: dict[str, torch.Tensor], mixtral_names: bool) -> dict[str, torch.Tensor]:
    """The tensors of a stacked-experts checkpoint with one tensor per expert: Mixtral's
    `block_sparse_moe.experts.{e}.w1/w3/w2` names or Qwen's `mlp.experts.{e}.*_proj`."""
    out = {}
    for name, t in stacked.items():
        stem, _, last = name.rpartition(".")
        if not stem.endswith("mlp.experts"):
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.") if mixtral_names else name] = t
            continue
        if mixtral_names:
            stem = stem.replace(".mlp.", ".block_sparse_moe.")
        names = ("w1", "w3", "w2") if mixtral_names else ("gate_proj", "up_proj", "down_proj")
        for e in range(t.shape[0]):
            if last == "gate_up_proj":
                gate, up = t[e].chunk(2)
                out[f"{stem}.{e}.{names[0]}.weight"] = gate.clone()
                out[f"{stem}.{e}.{names[1]}.weight"] = up.clone()
            else:
                out[f"{stem}.{e}.{names[2]}.weight"] = t[e].clone()
    return out


def write_shards(folder, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """tensors as num_shards safetensors files with an index, in place of model.safetensors."""
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::num_shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_every_expert_layout_loads_the_same_weights(tmp_path, kind):
    """Stacked (transformers 5's own names), save_pretrained's default one-per-expert, and
    hand-split checkpoints under both per-expert naming schemes, sharded: equal weights,
    and logits equal to transformers."""
    extra = dict(num_local_experts=8) if kind == "mixtral" else dict(mlp_only_layers=[0])
    stacked = make_hf_checkpoint(tmp_path / "stacked", kind, stacked_experts=True, seed=4, **extra)
    keys = load_file(stacked / "model.safetensors")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    per_expert = make_hf_checkpoint(tmp_path / "per_expert", kind, seed=4, **extra)
    expert = "block_sparse_moe.experts.0.w1" if kind == "mixtral" else "mlp.experts.0.gate_proj"
    assert any(expert in k for k in load_file(per_expert / "model.safetensors"))
    ref, _, _ = load_model(str(stacked))
    folders = [per_expert]
    for mixtral_names in (False, True):
        folder = make_hf_checkpoint(tmp_path / f"split_{mixtral_names}", kind,
                                    stacked_experts=True, seed=4, **extra)
        write_shards(folder, split_experts(keys, mixtral_names), num_shards=3)
        folders.append(folder)
    prompt = tokens(15, seed=8, vocab=320)
    want = hf_logits(stacked, prompt)
    for folder in folders:
        model, _, _ = load_model(str(folder))
        for (name, p), q in zip(ref.state_dict().items(), model.state_dict().values()):
            assert torch.equal(p, q), f"{folder.name}: {name}"
        with torch.no_grad():
            torch.testing.assert_close(model.dense_logits(torch.tensor(prompt)), want,
                                       atol=ATOL, rtol=0)


def test_weight_updates_by_either_expert_layout(tmp_path):
    """hf_named_tensors names the experts as transformers 5 does (so a trainer's
    named_parameters go straight in); update_hf_weights takes them stacked or one tensor
    per expert, and changes nothing on a bad name or shape."""
    folder = make_hf_checkpoint(tmp_path / "m", "qwen3_moe", mlp_only_layers=[1], seed=5)
    model, cfg, _ = load_model(str(folder))
    hf = hf_model(str(folder))
    ours = model.hf_named_tensors()
    theirs = {n: p for n, p in hf.named_parameters()}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    stacked = "model.layers.0.mlp.experts.gate_up_proj"
    new = torch.randn_like(ours[stacked])
    model.update_hf_weights([(stacked, new)])
    assert torch.equal(model.hf_named_tensors()[stacked], new)
    down = torch.randn(cfg.hidden_size, cfg.moe_intermediate_size)
    model.update_hf_weights([("model.layers.2.block_sparse_moe.experts.3.w2.weight", down)])
    assert torch.equal(model.layers[2].mlp.experts.down_proj[3], down)
    before = {n: t.clone() for n, t in model.hf_named_tensors().items()}
    for bad in ([("model.layers.0.mlp.experts.4.up_proj.weight", down.T)],  # expert 4 of 4
                [("model.layers.0.mlp.experts.1.up_proj.weight", down)],  # transposed
                [("model.layers.1.mlp.experts.gate_up_proj", new)]):  # a dense layer
        with pytest.raises(ValueError):
            model.update_hf_weights([(stacked, torch.zeros_like(new)), *bad])
    assert all(torch.equal(before[n], t) for n, t in model.hf_named_tensors().items())


def test_missing_expert_is_refused(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "m", "mixtral")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 'layers\.1\.mlp\.experts\.2\.up_proj"):
        load_model(str(folder))


# -- configs ------------------------------------------------------------------------------


def config(kind: str, **fields) -> dict:
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, model_type=kind)
    return {**base, **fields}


def test_moe_fields_and_windows_follow_transformers():
    cfg = hf_model_config(config("mixtral", num_local_experts=8, sliding_window=16,
                                 use_sliding_window=False))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 128)
    assert cfg.norm_topk_prob and cfg.moe_layers == [True] * 4 and not cfg.qk_norm
    assert cfg.layer_windows == [16] * 4  # Mixtral has no use_sliding_window switch
    cfg = hf_model_config(config("qwen3_moe", num_experts=16, num_experts_per_tok=4,
                                 moe_intermediate_size=32, decoder_sparse_step=2,
                                 mlp_only_layers=[3], sliding_window=16, max_window_layers=2))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (16, 4, 32)
    assert cfg.moe_layers == [False, True, False, False] and cfg.qk_norm
    assert not cfg.norm_topk_prob and cfg.layer_windows == [None] * 4
    cfg = hf_model_config(config("qwen3_moe", num_local_experts=4, num_experts_per_tok=2,
                                 use_sliding_window=True,
                                 sliding_window=16, max_window_layers=2))
    assert cfg.num_experts == 4 and cfg.layer_windows == [16] * 4
    assert hf_model_config(config("llama")).moe_layers == [False] * 4


@pytest.mark.parametrize("fields, match", [
    (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_local_experts=0), "num_local_experts"),
    (dict(num_local_experts=1 << 13), "num_local_experts"),
])
def test_bad_moe_configs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        hf_model_config(config("mixtral", **fields))


def test_unsupported_family_names_the_moe_families():
    with pytest.raises(ValueError, match="mixtral, qwen3_moe"):
        hf_model_config(config("deepseek_v3"))


# -- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,extra", [
    ("mixtral", dict(num_local_experts=8, sliding_window=9)),
    ("qwen3_moe", dict(num_experts=8, mlp_only_layers=[2], norm_topk_prob=True)),
])
def test_batched_chunked_greedy_matches_transformers(tmp_path, kind, extra):
    path = make_hf_checkpoint(tmp_path / kind, kind, num_kv_heads=2, **extra)
    for _, gen in batched_greedy_matches_hf(path, (5, 23, 40, 57), 48):
        assert len(set(gen.tokens)) > 5  # a test of something, not of one loop

def test_deterministic_mode_is_batch_invariant(tmp_path):
    """Batch-invariant matmuls reach the experts: a session alone equals it inside a batch
    bit for bit, greedy equals transformers, and the dense forward (the trainer's view)
    reproduces the engine's logprobs exactly."""
    path = make_hf_checkpoint(tmp_path / "m", "qwen3_moe", num_experts=8, mlp_only_layers=[1])
    prompts = [list(range(3, 30)), list(range(40, 51)), list(range(100, 140))]
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
