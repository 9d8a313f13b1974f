"""Model runner: the only place that turns a step's chunks into tensors and runs them.

Owns the KV pools, block-major: the device tier `[num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim]` and the host tier of the same shape (pinned memory on CUDA).
"""

from __future__ import annotations

import numpy as np
import torch

from agentos.kernel.attention import AttnMeta, PrefillChunk
from agentos.kernel.model import LlamaModel
from agentos.kernel.sampler import sample
from agentos.kernel.sched import Chunk


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, device, dtype,
                 num_host_blocks: int = 0):
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        # NOTE: block-major, so one block of every layer is one contiguous run of bytes and
        # a swap moves whole blocks at memcpy speed. zeros, not empty: padded decode reads
        # unwritten slots (masked, times 0), and 0 * NaN garbage would still poison the row
        shape = (cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv = _zeros((num_blocks, *shape), dtype, self.device)
        self.host_kv = _zeros((num_host_blocks, *shape), dtype, torch.device("cpu"),
                              pin=self.device.type == "cuda")
        # NOTE: on CUDA, swaps run on a side stream that starts after the compute queued
        # before them; the next step's compute waits for the stream (see run_copies)
        self._swap_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @staticmethod
    def block_bytes(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.cfg
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies whole device blocks src -> dst (copy-on-write)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.kv.index_copy_(0, dst, self.kv.index_select(0, src))

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to host blocks: (device slot, host slot) pairs."""
        self._swap(self.kv, self.host_kv, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies host blocks to device blocks: (host slot, device slot) pairs."""
        self._swap(self.host_kv, self.kv, pairs)

    def run_copies(self, ops: list[tuple[str, list[tuple[int, int]]]]) -> None:
        """Performs a step's block copies ("cow", "out", "in") in the order decided: a slot
        freed by one copy may be the destination of a later one."""
        for kind, pairs in ops:
            if kind == "cow":
                self.copy_blocks(pairs)
            elif kind == "out":
                self.swap_out(pairs)
            else:
                self.swap_in(pairs)
        if self._swap_stream is not None and ops:
            torch.cuda.current_stream(self.device).wait_stream(self._swap_stream)

    def _swap(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        if self._swap_stream is not None:
            # the side stream starts after compute queued so far (which may still read or
            # write these slots), and compute after it (run_copies joins the streams)
            self._swap_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._swap_stream):
                _copy_runs(src, dst, pairs)
        else:
            _copy_runs(src, dst, pairs)

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk], page_slots: np.ndarray) -> tuple[list[int], list[float]]:
        """Runs one step: writes every chunk's KV and samples for chunks with `sample`.

        Decode chunks (one token) must come first; every page of their tables must be on
        the device, at `page_slots[page]`. Returns (token ids, logprobs) in the order of
        the sampling chunks.
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
            table = page_slots[p.table.block_ids[: -(-c.end // bs)]]
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
                                             torch.from_numpy(table[:nb]).to(self.device)))
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


def _copy_runs(src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """dst[d] = src[s] for each (s, d) pair of block slots, in as few passes as possible.

    Runs where both sides are consecutive become slice copies; when one side is a single
    run (the usual swap: the host slots of a batch are allocated together) the other side
    is gathered or scattered straight into it. Only the general case goes through a
    staging tensor. Across devices the transfer itself is always one contiguous copy.
    """
    s_idx = [s for s, _ in pairs]
    d_idx = [d for _, d in pairs]
    n = len(pairs)
    s_run = s_idx[-1] - s_idx[0] == n - 1 and _consecutive(s_idx)
    d_run = d_idx[-1] - d_idx[0] == n - 1 and _consecutive(d_idx)
    nb = src.device != dst.device
    if s_run and d_run:
        dst[d_idx[0] : d_idx[0] + n].copy_(src[s_idx[0] : s_idx[0] + n], non_blocking=nb)
    elif d_run:  # gather into one destination run
        out, idx = dst[d_idx[0] : d_idx[0] + n], torch.tensor(s_idx, device=src.device)
        if nb:
            out.copy_(src.index_select(0, idx), non_blocking=True)
        else:  # NOTE: gather straight into place: one pass over the bytes, not two
            torch.index_select(src, 0, idx, out=out)
    elif s_run:  # scatter from one source run
        part = src[s_idx[0] : s_idx[0] + n].to(dst.device, non_blocking=nb)
        dst.index_copy_(0, torch.tensor(d_idx, device=dst.device), part)
    else:
        part = src.index_select(0, torch.tensor(s_idx, device=src.device))
        dst.index_copy_(0, torch.tensor(d_idx, device=dst.device), part.to(dst.device, non_blocking=nb))


def _consecutive(ids: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(ids, ids[1:]))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
           pin: bool = False) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    if pin:  # page-locked host memory, so transfers to and from the device are async DMA
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    # NOTE: numpy's zeros is calloc: the OS hands out zero pages lazily, so a pool of
    # gigabytes costs nothing until used (torch.zeros would memset all of it up front)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
