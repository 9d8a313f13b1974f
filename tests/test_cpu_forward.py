"""The C++ decode step of the CPU (kernel/runner/cpu_kernels.py `forward`), and `step` (torch's
GEMMs with C++ between them) for steps with prefills, against the torch path they replace,
for every dense family and option the loader takes: the same logits and the same K/V
written, bad indices refused before anything is written, and the torch path kept wherever
the step is not one they run."""

import pytest
import torch

from agentos.kernel.runner import cpu_kernels
from agentos.kernel.runner.attention import AttnMeta, PrefillChunk
from agentos.kernel.runner.loader import load_model
from hf_models import make_hf_checkpoint

BS = 8  # block size of the test pools

CASES = {
    "llama": ("llama", {}),
    "llama-bias-tied-gelu": ("llama", {"bias": True, "tie": True, "mlp_bias": True,
                                       "hidden_act": "gelu"}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral-window": ("mistral", {"sliding_window": 13}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"sliding_window": 11}),
    # sizes that are not multiples of the kernel's 8-wide vectors or 4-row groups
    "odd-sizes": ("mistral", {"hidden_size": 36, "intermediate_size": 50, "head_dim": 6,
                            "num_attention_heads": 6, "num_key_value_heads": 3,
                            "vocab_size": 301}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    folder = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), kind, **overrides)
    return load_model(str(folder))[0]


def _step(model, B, seed=0, pool_blocks=None):
    """A decode step of B sequences of random lengths over a random pool (so attention
    reads real context): (input_ids, positions, meta, kv, logits_indices)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    per = 6  # blocks per sequence
    kv = torch.randn(pool_blocks or B * per + 1, cfg.num_layers, 2, BS, cfg.num_kv_heads,
                     cfg.head_dim, generator=g)
    tables = (torch.randperm(kv.shape[0] - 1, generator=g)[: B * per] + 1).view(B, per)
    lens = torch.randint(1, per * BS + 1, (B,), generator=g)
    lens[0] = per * BS
    positions = lens - 1
    slots = tables.gather(1, (positions // BS)[:, None])[:, 0] * BS + positions % BS
    for b in range(B):
        tables[b, -(-int(lens[b]) // BS):] = 0
    ids = torch.randint(0, cfg.vocab_size, (B,), generator=g)
    meta = AttnMeta(slot_mapping=slots, num_decodes=B, decode_block_tables=tables,
                    decode_ctx_lens=lens)
    rows = torch.arange(B) if B < 3 else torch.tensor([B - 1, 0, 2])  # a subset, reordered
    return ids, positions, meta, kv, rows


def _torch_forward(model, ids, positions, meta, kv, rows, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "FORWARD_MAX_ROWS", 0)
        assert not cpu_kernels.takes_forward(model, ids, meta, kv, rows)
        return model(ids, positions, meta, kv, rows)


@pytest.mark.parametrize("B", [1, 2, 7, 16])  # 7: row groups of 4, 2 and 1
def test_forward_equals_torch_path(model, B, monkeypatch):
    ids, positions, meta, kv, rows = _step(model, B, seed=B)
    want_kv = kv.clone()
    want = _torch_forward(model, ids, positions, meta, want_kv, rows, monkeypatch)
    assert cpu_kernels.takes_forward(model, ids, meta, kv, rows)
    got = model(ids, positions, meta, kv, rows)
    assert got.shape == want.shape == (len(rows), model.cfg.vocab_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(kv, want_kv, atol=1e-5, rtol=1e-5)  # the same K/V at the slots
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bad_indices_raise_and_write_nothing(model):
    ids, positions, meta, kv, rows = _step(model, 2)
    before = kv.clone()
    cfg = model.cfg
    bad = [
        ("token id", lambda: (ids + cfg.vocab_size, positions, meta, rows)),
        ("negative id", lambda: (ids - 10**6, positions, meta, rows)),
        ("position", lambda: (ids, positions + 10**9, meta, rows)),
        ("slot", lambda: (ids, positions, AttnMeta(
            meta.slot_mapping + kv.shape[0] * BS, 2, meta.decode_block_tables,
            meta.decode_ctx_lens), rows)),
        ("block id", lambda: (ids, positions, AttnMeta(
            meta.slot_mapping, 2, meta.decode_block_tables + kv.shape[0],
            meta.decode_ctx_lens), rows)),
        ("context length", lambda: (ids, positions, AttnMeta(
            meta.slot_mapping, 2, meta.decode_block_tables, meta.decode_ctx_lens + 10**6), rows)),
        ("empty context", lambda: (ids, positions, AttnMeta(
            meta.slot_mapping, 2, meta.decode_block_tables, meta.decode_ctx_lens * 0), rows)),
        ("logits row", lambda: (ids, positions, meta, rows + 2)),
    ]
    for what, make in bad:
        i, p, m, r = make()
        assert cpu_kernels.takes_forward(model, i, m, kv, r), what
        with pytest.raises(IndexError):
            model(i, p, m, kv, r)
        assert torch.equal(kv, before), what


def test_moved_weights_are_followed(model, monkeypatch):
    """A weight given new storage (param.data = ..., as .to() does) is read from there; one
    of the wrong shape is refused."""
    ids, positions, meta, kv, rows = _step(model, 1)
    w = model.layers[0].mlp.down_proj.weight
    old = w.data
    model(ids, positions, meta, kv.clone(), rows)  # the plan holds the old addresses
    try:
        w.data = old * 3
        want = _torch_forward(model, ids, positions, meta, kv.clone(), rows, monkeypatch)
        torch.testing.assert_close(model(ids, positions, meta, kv.clone(), rows), want,
                                   atol=2e-5, rtol=1e-4)
        w.data = old[:, :-1].contiguous()
        with pytest.raises(ValueError, match="shape"):
            model(ids, positions, meta, kv.clone(), rows)
    finally:
        w.data = old


def test_steps_it_does_not_run_take_the_torch_path(tmp_path, monkeypatch):
    model = load_model("tiny")[0]
    ids, positions, meta, kv, rows = _step(model, 2)
    assert cpu_kernels.takes_forward(model, ids, meta, kv, rows)
    # a prefill in the step
    pre = AttnMeta(meta.slot_mapping, 1, meta.decode_block_tables[:1], meta.decode_ctx_lens[:1],
                   prefills=[PrefillChunk(1, 1, 5, meta.decode_block_tables[1])])
    assert not cpu_kernels.takes_forward(model, ids, pre, kv, rows)
    # batch-invariant steps, too many rows, a bfloat16 pool, the torch or Triton backend
    det = AttnMeta(meta.slot_mapping, 2, meta.decode_block_tables, meta.decode_ctx_lens,
                   deterministic=True)
    assert not cpu_kernels.takes_forward(model, ids, det, kv, rows)
    monkeypatch.setattr(cpu_kernels, "FORWARD_MAX_ROWS", 1)
    assert not cpu_kernels.takes_forward(model, ids, meta, kv, rows)
    monkeypatch.undo()
    assert not cpu_kernels.takes_forward(model, ids, meta, kv.bfloat16(), rows)
    from agentos.kernel.runner import attention

    for backend in ("torch", "triton"):
        monkeypatch.setattr(attention, "BACKEND", backend)
        assert not cpu_kernels.takes_forward(model, ids, meta, kv, rows)
    monkeypatch.undo()
    # a bfloat16 model, an MoE model
    assert not cpu_kernels.takes_forward(load_model("tiny", dtype="bfloat16")[0], ids, meta,
                                         kv.bfloat16(), rows)
    moe = load_model(str(make_hf_checkpoint(tmp_path, "mixtral")))[0]
    ids, positions, meta, kv, rows = _step(moe, 2)
    assert not cpu_kernels.takes_forward(moe, ids, meta, kv, rows)


def test_batch_invariant_matmul_keeps_the_torch_path():
    from agentos.kernel.runner.batch_invariant import make_batch_invariant

    model = load_model("tiny")[0]
    ids, positions, meta, kv, rows = _step(model, 1)
    make_batch_invariant(model)
    assert not cpu_kernels.takes_forward(model, ids, meta, kv, rows)


def test_model_stays_copyable_and_its_plan_goes_with_it():
    import copy
    import gc
    import weakref

    model = load_model("tiny")[0]
    ids, positions, meta, kv, rows = _step(model, 1)
    want = model(ids, positions, meta, kv.clone(), rows)
    twin = copy.deepcopy(model)  # the plan (ctypes pointers) is not on the model
    torch.testing.assert_close(twin(ids, positions, meta, kv.clone(), rows), want)
    assert twin in cpu_kernels._PLANS
    gone = weakref.ref(twin)
    del twin
    gc.collect()
    assert gone() is None  # its plan does not keep it alive (and its entry went with it)


def _mixed_step(model, seed=0):
    """A step of 3 decodes and 3 prefill chunks (two of 5 new tokens with no cached
    context, one of 3 continuing 6 cached tokens) over a random pool:
    (input_ids, positions, meta, kv, logits_indices)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids, positions, meta, kv, _ = _step(model, 3, seed=seed, pool_blocks=64)
    used = set(meta.decode_block_tables.flatten().tolist())
    free = iter(b for b in torch.randperm(kv.shape[0] - 1, generator=g).add(1).tolist()
                if b not in used)
    chunks, slots, pos, start = [], [meta.slot_mapping], [positions], 3
    for n, cached in [(5, 0), (5, 0), (3, 6)]:
        ctx = cached + n
        table = torch.tensor([next(free) for _ in range(-(-ctx // BS))])
        p = torch.arange(cached, ctx)
        pos.append(p)
        slots.append(table[p // BS] * BS + p % BS)
        chunks.append(PrefillChunk(start, n, ctx, table))
        start += n
    ids = torch.cat([ids, torch.randint(0, cfg.vocab_size, (start - 3,), generator=g)])
    meta = AttnMeta(slot_mapping=torch.cat(slots), num_decodes=3,
                    decode_block_tables=meta.decode_block_tables,
                    decode_ctx_lens=meta.decode_ctx_lens, prefills=chunks)
    rows = torch.tensor([0, 2, 7, 12, 15])  # decodes and each chunk's last token
    return ids, torch.cat(pos), meta, kv, rows


@pytest.mark.parametrize("matvec_rows", [0, cpu_kernels.STEP_MATVEC_MAX_ROWS])
def test_step_equals_torch_path(model, matvec_rows, monkeypatch):
    """A step with prefills runs step(): its matrix products through MKL's GEMMs (or, at
    most STEP_MATVEC_MAX_ROWS rows, matvec), torch's attention, the rest in C++; the same
    logits and K/V as the torch path."""
    monkeypatch.setattr(cpu_kernels, "STEP_MATVEC_MAX_ROWS", matvec_rows)
    ids, positions, meta, kv, rows = _mixed_step(model)
    assert not cpu_kernels.takes_forward(model, ids, meta, kv, rows)
    assert cpu_kernels.takes_step(model, ids, meta, kv)
    want_kv = kv.clone()
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "takes_step", lambda *a: False)
        want = model(ids, positions, meta, want_kv, rows)
    got = model(ids, positions, meta, kv, rows)
    assert got.shape == want.shape == (len(rows), model.cfg.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(kv, want_kv, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_step_bad_indices_raise_and_write_nothing(model):
    ids, positions, meta, kv, rows = _mixed_step(model)
    before = kv.clone()
    moved = AttnMeta(meta.slot_mapping + kv.shape[0] * BS, meta.num_decodes,
                     meta.decode_block_tables, meta.decode_ctx_lens, prefills=meta.prefills)
    for what, args in [("token id", (ids + model.cfg.vocab_size, positions, meta)),
                       ("position", (ids, positions + 10**9, meta)),
                       ("slot", (ids, positions, moved))]:
        assert cpu_kernels.takes_step(model, args[0], args[2], kv), what
        with pytest.raises(IndexError):
            model(*args, kv, rows)
        assert torch.equal(kv, before), what


@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 9, 32, 67])
def test_matvec_equals_linear(rows):
    """matvec (the decode step's weight products, and step()'s for short chunks) at row
    counts of one pass over the inputs and of several (where it asks for the next weight
    rows ahead), with none at all (a step that wants no logits), and weight shapes that are
    not multiples of its 4-row groups or 8-wide vectors: the same products as F.linear."""
    lib = cpu_kernels._library()
    if lib is None:
        pytest.skip("no C++ compiler")
    g = torch.Generator().manual_seed(rows)
    for n, k in [(301, 36), (7, 64), (1024, 256)]:
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        x, y = torch.randn(rows, k, generator=g), torch.full((rows, n), float("nan"))
        lib.agentos_matvec_f32(w.data_ptr(), b.data_ptr(), x.data_ptr(), y.data_ptr(), rows, n,
                               k, torch.get_num_threads())
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
