"""load_model: the tiny preset, HF folders, dtype/device choice, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from agentos.kernel.runner.loader import _resolve_dtype, load_model, tiny_hf_config, tiny_hf_weights
from agentos.kernel.runner.tokenizer import ByteTokenizer, HFTokenizer
from hf_models import make_hf_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", with_tokenizer=True)


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_tiny_is_deterministic_and_ready():
    a, b = tiny_hf_weights(), tiny_hf_weights()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # pinned so a change of generator or draw order shows up (it would change every tiny result)
    first = a["model.embed_tokens.weight"][0, :4]
    torch.testing.assert_close(first, torch.tensor([-0.0225, -0.0230, -0.0050, -0.0087]),
                               atol=1e-4, rtol=0)
    assert "lm_head.weight" not in a and tiny_hf_config()["tie_word_embeddings"]
    model, cfg, tok = load_model("tiny")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.intermediate_size) == (260, 256, 4, 8, 4, 32, 768)
    assert cfg.max_position_embeddings == 32768 and cfg.tie_word_embeddings
    assert isinstance(tok, ByteTokenizer) and cfg.eos_token_ids == [257] and cfg.bos_token_id == 256
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.cos_table.dtype == torch.float32


def test_dtype_choice(llama_dir):
    model, _, _ = load_model(str(llama_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _, _ = load_model(str(llama_dir), dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model("tiny", dtype="float8")
    with pytest.raises(ValueError, match="floating point"):
        load_model("tiny", dtype=torch.int32)


def test_default_dtype_follows_device_and_config():
    cuda = torch.device("cuda")
    assert _resolve_dtype(None, torch.device("cpu"), {"torch_dtype": "bfloat16"}) == torch.float32
    assert _resolve_dtype(None, cuda, {"torch_dtype": "float16"}) == torch.float16
    assert _resolve_dtype("auto", cuda, {"dtype": "float32"}) == torch.float32
    assert _resolve_dtype(None, cuda, {}) == torch.bfloat16
    assert _resolve_dtype("fp16", torch.device("cpu"), {}) == torch.float16


def test_bad_device():
    with pytest.raises(ValueError, match="bad device"):
        load_model("tiny", device="toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("tiny", device="cuda")


def test_hf_tokenizer_and_eos_ids(llama_dir, tmp_path):
    _, cfg, tok = load_model(str(llama_dir))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, [1])
    assert cfg.eos_token_ids == [1]
    folder = make_hf_checkpoint(tmp_path / "gen", "qwen2")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    _, cfg, tok = load_model(str(folder))
    assert cfg.eos_token_ids == [1, 7]
    assert isinstance(tok, ByteTokenizer)  # no tokenizer.json


def test_missing_things(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="neither 'tiny', a folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_missing_shard_and_tensor(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "sharded", "llama", shards=3)
    shards = sorted(folder.glob("model-*.safetensors"))
    tensors = load_file(shards[-1])
    name = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != name}, shards[-1])
    with pytest.raises(ValueError, match="lacks"):
        load_model(str(folder))
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(str(folder))


def test_weights_not_matching_config(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "m", "llama")
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match="shape"):
        load_model(str(folder))


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model_type"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported rope_type"),
    ({"hidden_act": "relu2"}, "unsupported hidden_act"),
    ({"vocab_size": 200}, "byte-level fallback"),
])
def test_unsupported_configs(tmp_path, changes, match):
    folder = make_hf_checkpoint(tmp_path / "m", "llama")
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(str(folder))


def test_sliding_window_layers_follow_the_config(tmp_path):
    """Which layers slide, read as transformers reads it (the attention itself is checked
    against transformers in test_model.py)."""
    folder = make_hf_checkpoint(tmp_path / "mistral", "mistral", sliding_window=16)
    assert load_model(str(folder))[1].layer_windows == [16, 16, 16]
    edit_config(folder, use_sliding_window=False)
    assert load_model(str(folder))[1].layer_windows == [None] * 3
    folder = make_hf_checkpoint(tmp_path / "qwen", "qwen2", use_sliding_window=True,
                                sliding_window=16, max_window_layers=1)
    assert load_model(str(folder))[1].layer_windows == [None, 16, 16]
    edit_config(folder, use_sliding_window=False)
    assert load_model(str(folder))[1].layer_windows == [None] * 3
    edit_config(folder, use_sliding_window=True, sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window"):
        load_model(str(folder))


def test_model_type_from_architectures(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "m", "qwen2")
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    _, cfg, _ = load_model(str(folder))
    assert cfg.model_type == "qwen2" and cfg.qkv_bias
