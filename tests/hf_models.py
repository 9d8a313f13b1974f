"""Small random Hugging Face checkpoints and their transformers reference outputs.

Shared by the test files: `make_hf_checkpoint` writes a folder that `load_model` and
transformers both read; `hf_logits` / `hf_generate` are the reference answers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, HEAD_DIM = 64, 128, 3, 4, 16
BOS, EOS, PAD = 0, 1, 2  # the special ids of make_bpe_tokenizer, used by every config
TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sessions are processes; the KV cache is paged virtual memory.",
    "def fork(self, n: int) -> list[Session]:\n    return [self.copy() for _ in range(n)]",
    "Grüße aus Köln! 東京は晴れです。 Emoji: 🦊🐶👍🏽 and ✨.",
    "copy-on-write, swap_out, swap_in, snapshot, rollback",
]


def make_hf_checkpoint(
    path: str | Path, kind: str = "llama", *, tie: bool = False, bias: bool = False,
    num_kv_heads: int = 2, rope_scaling: dict | None = None, shards: int = 1, seed: int = 0,
    vocab_size: int = 320, with_tokenizer: bool = False, stacked_experts: bool = False,
    **overrides,
) -> Path:
    """Writes a small random transformers model of `kind` ("llama", "qwen2", "qwen3", "mistral",
    "mixtral", "qwen3_moe", "gemma", "gemma2") with `save_pretrained` into `path` and returns
    the folder.

    bias: llama attention_bias (q/k/v/o); qwen2 always has q/k/v bias. shards > 1 cuts the
    safetensors into about that many files (with an index). Weights are re-drawn from a
    generator seeded `seed` with std 0.1 (norm weights 1 +- 0.1, biases non-zero; Gemma's
    norm weights are offsets from 1, so they are drawn +- 0.1), so greedy outputs are not
    degenerate. overrides go to the transformers config (and may replace the shared sizes). MoE kinds
    default to 4 experts, top-2 (qwen3_moe: experts 40 wide); save_pretrained writes one
    tensor per expert (Mixtral: `block_sparse_moe.experts.{e}.w1/w2/w3`), or with
    `stacked_experts` the stacked tensors transformers 5 holds (`save_original_format=False`).
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    rope = {"rope_theta": 10000.0, "rope_type": "default", **(rope_scaling or {})}
    if kind == "llama":
        config = LlamaConfig(**common, head_dim=HEAD_DIM, attention_bias=bias,
                             rope_parameters=rope, **overrides)
        model_cls = LlamaForCausalLM
    elif kind == "qwen2":
        config = Qwen2Config(**common, rope_parameters=rope, **overrides)
        model_cls = Qwen2ForCausalLM
    elif kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(**common, head_dim=HEAD_DIM, rope_parameters=rope, **overrides)
        model_cls = Qwen3ForCausalLM
    elif kind == "mistral":
        config = MistralConfig(**{**common, "head_dim": HEAD_DIM, "sliding_window": None,
                                  "rope_parameters": rope, **overrides})
        model_cls = MistralForCausalLM
    elif kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(**{**common, "head_dim": HEAD_DIM, "rope_parameters": rope,
                                  "num_local_experts": 4, "num_experts_per_tok": 2, **overrides})
        model_cls = MixtralForCausalLM
    elif kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(**{**common, "head_dim": HEAD_DIM, "rope_parameters": rope,
                                   "num_experts": 4, "num_experts_per_tok": 2,
                                   "moe_intermediate_size": 40, **overrides})
        model_cls = Qwen3MoeForCausalLM
    elif kind == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM

        config = GemmaConfig(**{**common, "head_dim": HEAD_DIM, "attention_bias": bias,
                                "rope_parameters": rope, **overrides})
        model_cls = GemmaForCausalLM
    elif kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        config = Gemma2Config(**{**common, "head_dim": HEAD_DIM, "attention_bias": bias,
                                 "rope_parameters": rope, **overrides})
        model_cls = Gemma2ForCausalLM
    else:
        raise ValueError(f"unknown kind {kind!r}")
    _quiet_transformers()
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            one = 0.0 if kind.startswith("gemma") else 1.0  # Gemma norms scale by (1 + weight)
            p.copy_(one + noise if name.endswith("norm.weight") else noise)
    folder = Path(path)
    max_shard = None
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard = total // shards + 1
    model.save_pretrained(folder, max_shard_size=max_shard or "50GB",
                          save_original_format=not stacked_experts)
    if with_tokenizer:
        make_bpe_tokenizer(folder)
    return folder


def make_bpe_tokenizer(folder: str | Path, vocab_size: int = 300, add_bos: bool = True) -> Path:
    """Trains a byte-level BPE (specials <s>=0, </s>=1, <pad>=2) on TOKENIZER_TEXTS and
    writes tokenizer.json plus a tokenizer_config.json naming bos/eos. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXTS, trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
              "pad_token": "<pad>", "add_bos_token": add_bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@functools.lru_cache(maxsize=16)
def hf_model(path: str):
    """Returns the transformers model of folder `path` in float32, eval mode (cached)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(path: str | Path, token_ids: list[int]) -> torch.Tensor:
    """Returns transformers' fp32 logits [T, V] for one sequence, no cache."""
    with torch.no_grad():
        out = hf_model(str(path))(torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()


def hf_generate(path: str | Path, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Returns the new tokens of transformers' greedy `generate` (no eos stop)."""
    model = hf_model(str(path))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=None, pad_token_id=PAD)
    return out[0, len(token_ids):].tolist()


def batched_greedy_matches_hf(path: str | Path, lengths: tuple[int, ...], new_tokens: int,
                              kv_blocks: int = 512) -> list:
    """Random prompts of `lengths` generate greedily together in one engine under a 16-token
    step budget (chunked prefill beside other sessions' decodes). Asserts they ran batched,
    equal transformers' greedy tokens and carry its log-softmax at each chosen token, and
    that the engine's tables stay consistent. Returns [(prompt, Generation)]."""
    from concurrent.futures import ThreadPoolExecutor

    from agentos import Engine

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in lengths]
    with Engine(str(path), kv_blocks=kv_blocks, block_size=4, max_batch_tokens=16) as engine:
        sessions = [engine.create_session(tokens=p) for p in prompts]
        with ThreadPoolExecutor(len(sessions)) as pool:
            gens = list(pool.map(lambda s: s.generate(max_tokens=new_tokens, temperature=0.0,
                                                      ignore_eos=True), sessions))
        assert engine.stats()["steps"] < len(prompts) * new_tokens  # they really ran batched
        for p, gen in zip(prompts, gens):
            assert gen.tokens == hf_generate(path, p, new_tokens)
            # logprobs are the model's own log-softmax at each chosen token
            ref = torch.log_softmax(hf_logits(path, p + gen.tokens), dim=-1)
            chosen = ref[len(p) - 1 : -1].gather(1, torch.tensor(gen.tokens)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(gen.logprobs), chosen, atol=1e-4)
        engine.check()
    return list(zip(prompts, gens))


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def make_sentencepiece_tokenizer(folder: str | Path, vocab_size: int = 200) -> Path:
    """Writes a Llama-2 style tokenizer.json (BPE over "▁"-marked words, byte fallback
    tokens <0x00>..<0xFF>, a decoder that strips the leading space) trained on
    TOKENIZER_TEXTS, with a tokenizer_config.json (<s> bos added, </s> eos). Returns the
    folder."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=40, show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXTS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    vocab.update({f"<0x{b:02X}>": first + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
