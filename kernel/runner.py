"""Model runner: the only place that turns a step's chunks into tensors and runs them.

Owns the KV pool tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import numpy as np
import torch

from agentos.kernel.attention import AttnMeta, PrefillChunk
from agentos.kernel.model import LlamaModel
from agentos.kernel.sampler import sample
from agentos.kernel.sched import Chunk


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, device, dtype):
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        # NOTE: zeros, not empty: padded decode reads unwritten slots (masked, times 0),
        # and 0 * NaN garbage would still poison the row
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv = _zeros(shape, dtype, self.device)

    @staticmethod
    def block_bytes(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.cfg
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies whole blocks src -> dst in every layer (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.kv[:, :, dst] = self.kv[:, :, src]

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk]) -> tuple[list[int], list[float]]:
        """Runs one step: writes every chunk's KV and samples for chunks with `sample`.

        Decode chunks (one token) must come first. Returns (token ids, logprobs) in the
        order of the sampling chunks.
        """
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        logits_idx: list[int] = []
        prefills: list[PrefillChunk] = []
        num_decodes = 0
        dec_tables: list[np.ndarray] = []
        dec_lens: list[int] = []
        for c in chunks:
            p = c.proc
            table = p.table.block_ids
            pos = np.arange(c.start, c.end)
            q_start = len(ids)
            ids.extend(p.token_ids[c.start : c.end])
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            nb = -(-c.end // bs)
            if c.num_tokens == 1 and not prefills:
                num_decodes += 1
                dec_tables.append(table[:nb])
                dec_lens.append(c.end)
            else:
                prefills.append(PrefillChunk(q_start, c.num_tokens, c.end,
                                             torch.from_numpy(table[:nb].copy()).to(self.device)))
            if c.sample:
                logits_idx.append(len(ids) - 1)
        dev = self.device
        meta = AttnMeta(
            slot_mapping=torch.from_numpy(np.concatenate(slot_parts)).to(dev),
            num_decodes=num_decodes, prefills=prefills,
        )
        if num_decodes:
            width = max(len(t) for t in dec_tables)
            tables = np.zeros((num_decodes, width), dtype=np.int64)
            for i, t in enumerate(dec_tables):
                tables[i, : len(t)] = t
            meta.decode_block_tables = torch.from_numpy(tables).to(dev)
            meta.decode_ctx_lens = torch.tensor(dec_lens, device=dev)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos_parts)).to(dev)
        if not logits_idx:
            self.model(input_ids, positions, meta, self.kv, input_ids[:0])
            return [], []
        logits = self.model(input_ids, positions, meta, self.kv,
                            torch.tensor(logits_idx, device=dev))
        sampled = [c for c in chunks if c.sample]
        return sample(logits, [c.proc.call.params for c in sampled], [c.proc.rng for c in sampled])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # NOTE: numpy's zeros is calloc: the OS hands out zero pages lazily, so a pool of
    # gigabytes costs nothing until used (torch.zeros would memset all of it up front)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
