"""Model runner: the only place that turns a step's chunks into tensors and runs them.

Owns the KV pools, block-major: the device tier `[num_blocks + 1, num_layers, 2, block_size,
num_kv_heads, head_dim]` (the last block is scratch, never allocated: padded rows of a CUDA
graph write there) and the host tier `[num_host_blocks, ...]` (pinned memory on CUDA).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from agentos.kernel.grammar import grammar_masks
from agentos.kernel.process import ScoreCall
from agentos.kernel.runner.attention import AttnMeta, PrefillChunk, SharedPrefix
from agentos.kernel.runner.cuda_graphs import CaptureError, DecodeGraphs, prefers_cascade
from agentos.kernel.runner.model import LlamaModel
from agentos.kernel.runner.sampler import sample, score
from agentos.kernel.sched import Chunk

log = logging.getLogger("agentos.runner")


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, device, dtype,
                 num_host_blocks: int = 0, deterministic: bool = False, cuda_graphs: bool = False,
                 max_batch_size: int = 256, max_model_len: int | None = None):
        cfg = model.cfg
        self.model = model
        self.deterministic = deterministic  # batch-invariant kernels (see batch_invariant.py)
        # NOTE: shared prefixes are attended once for all their rows (the cascade) only when
        # no layer slides: one step's AttnMeta serves every layer, and a sliding layer needs
        # each row's whole table (the window's start falls anywhere in it)
        self.cascade = not deterministic and not any(cfg.layer_windows)
        self.block_size = block_size
        self.device = torch.device(device)
        # NOTE: block-major, so one block of every layer is one contiguous run of bytes and
        # a swap moves whole blocks at memcpy speed. zeros, not empty: padded decode reads
        # unwritten slots (masked, times 0), and 0 * NaN garbage would still poison the row
        shape = (cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.scratch_block = num_blocks  # the allocator hands out slots 0 .. num_blocks - 1
        self.kv = _zeros((num_blocks + 1, *shape), dtype, self.device)
        self.host_kv = _zeros((num_host_blocks, *shape), dtype, torch.device("cpu"),
                              pin=self.device.type == "cuda")
        # NOTE: on CUDA, swaps run on a side stream that starts after the compute queued
        # before them; the next step's compute waits for the stream (see run_copies)
        self._swap_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # NOTE: not in deterministic mode: its batch-invariant kernels were not vetted for capture
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and not deterministic:
            max_blocks = -(-(max_model_len or cfg.max_position_embeddings) // block_size)
            self.graphs = DecodeGraphs(model, max_batch_size, max_blocks,
                                       self.scratch_block * block_size, self.device)
        self.num_eager_decodes = 0  # decode-only steps that ran eagerly
        # host seconds of every step's phases, summed (bench overhead): building the step's
        # index tensors and metadata, the model (its launches on CUDA: the device runs on;
        # with sync_phases, until the device is done), sampling and the outputs
        self.phase_s = {"prepare": 0.0, "forward": 0.0, "sample": 0.0}
        self.sync_phases = False  # CUDA: wait for the device after the forward (benchmarks)

    @property
    def capture_stats(self) -> dict[str, int]:
        """How decode-only steps ran, for benchmarks: graphs captured, graph replays, and
        eager runs (graphs off, cascade preferred, or larger than every graph)."""
        g = self.graphs
        return {"graphs_captured": g.num_captured if g else 0,
                "graph_replays": g.num_replays if g else 0,
                "eager_decode_steps": self.num_eager_decodes}

    @staticmethod
    def block_bytes(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.cfg
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize

    def release_kv(self, weights: bool = False) -> None:
        """Frees the device KV pool (its contents are lost: the kernel swapped out or
        dropped every page first); with `weights`, moves the weights to host memory too."""
        self._kv_shape = tuple(self.kv.shape)
        self.kv = self.kv.new_empty(0)
        if self.graphs is not None:
            self.graphs.clear()
        if weights and self.device.type != "cpu":
            self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore_kv(self) -> None:
        """Allocates the device KV pool again (zeroed) and brings the weights back."""
        self.model.to(self.device)
        self.kv = _zeros(self._kv_shape, self.kv.dtype, self.device)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies whole device blocks src -> dst (copy-on-write)."""
        if not pairs:
            return
        if self.kv.device.type == "cpu":
            # NOTE: a block at a time, in place: one pass over the bytes and, for blocks
            # under torch's grain size, no OpenMP region. Through a staging tensor (a
            # gather, then a scatter: two OpenMP regions), 17-31 copies at a step's start,
            # with the event loop busy admitting a batch of new sessions, took 1-17 ms;
            # this way 1-2 ms (the srcs are live pages, the dsts fresh ones, so no pair
            # reads what an earlier one wrote)
            for s, d in pairs:
                self.kv[d].copy_(self.kv[s])
            return
        src, dst = self._upload([np.array([s for s, _ in pairs], dtype=np.int64),
                                 np.array([d for _, d in pairs], dtype=np.int64)])
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
    def execute(self, chunks: list[Chunk], page_slots: np.ndarray) -> list:
        """Runs one step: writes every chunk's KV, samples for generate chunks that reach
        their session's end and scores the positions score calls ask for.

        Decode chunks (one token) must come first; every page of their tables must be on
        the device, at `page_slots[page]`. Returns one entry per chunk: None, (token id,
        logprob) for a sampled token, or (logprobs, NextTokenLogprobs | None) for a score
        call's positions in the chunk. On CUDA a decode-only step replays a captured graph
        (see cuda_graphs.py) when one fits.
        """
        t0 = time.perf_counter()
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        logits_idx: list[int] = []
        spans: list[tuple[int, int] | None] = []  # per chunk: its positions that need logits
        prefills: list[tuple[int, int, int, np.ndarray]] = []  # (q_start, q_len, ctx_len, table)
        num_decodes = _num_vector_decodes(chunks)
        dec_tables, dec_lens = _decode_indices(chunks[:num_decodes], page_slots, bs, ids,
                                               pos_parts, slot_parts)
        spans += [_logit_span(c) for c in chunks[:num_decodes]]
        logits_idx += [i for i, span in enumerate(spans) if span is not None]
        for c in chunks[num_decodes:]:
            p = c.proc
            table = page_slots[p.table.block_ids[: -(-c.end // bs)]]
            pos = np.arange(c.start, c.end)
            q_start = len(ids)
            ids.extend(p.token_ids[c.start : c.end])
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            if c.num_tokens == 1 and not prefills:
                dec_tables.append(table)
                dec_lens.append(c.end)
            else:
                prefills.append((q_start, c.num_tokens, c.end, table))
            span = _logit_span(c)
            spans.append(span)
            if span is not None:
                logits_idx.extend(range(q_start + span[0] - c.start, q_start + span[1] - c.start))
        positions, slots = np.concatenate(pos_parts), np.concatenate(slot_parts)
        # the grammar masks of the rows to sample
        masks = grammar_masks([c.proc.grammar for c, span in zip(chunks, spans)
                               if span is not None and not isinstance(c.proc.call, ScoreCall)],
                              self.model.cfg.vocab_size)
        shared = shared_prefixes(dec_tables, dec_lens, bs) if dec_tables and self.cascade else []
        phase = self.phase_s
        if not prefills:  # decode only: each span is at most the chunk's one position
            if self.graphs is not None and not (shared and prefers_cascade(shared, dec_tables)):
                try:
                    # NOTE: the graph's input copies count as its forward
                    t1 = time.perf_counter()
                    phase["prepare"] += t1 - t0
                    logits = self.graphs.run(self.kv, ids, positions, slots, dec_tables, dec_lens)
                    t0 = self._forward_done(t1)
                except CaptureError as e:
                    # NOTE: a capture runs over padding only (it writes the scratch slot), so
                    # the step can still run eagerly; graphs stay off from then on
                    log.warning("CUDA graph capture failed, decoding eagerly from now on: %s", e)
                    self.graphs, logits = None, None
                if logits is not None:
                    need = [i for i, span in enumerate(spans) if span is not None]
                    outs = self._outputs(chunks, spans,
                                         logits if len(need) == len(chunks) else logits[need], masks)
                    phase["sample"] += time.perf_counter() - t0
                    return outs
            self.num_eager_decodes += 1
        logits = self._forward(ids, positions, slots, logits_idx, prefills, dec_tables, dec_lens, shared,
                               t0)
        t0 = time.perf_counter()
        outs = self._outputs(chunks, spans, logits, masks)
        phase["sample"] += time.perf_counter() - t0
        return outs

    def _forward_done(self, t_start: float) -> float:
        """Ends the forward phase begun at t_start (waiting for the device with
        sync_phases); returns the time it ended."""
        if self.sync_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.phase_s["forward"] += t - t_start
        return t

    def _forward(self, ids: list[int], positions: np.ndarray, slots: np.ndarray,
                 logits_idx: list[int], prefills: list[tuple[int, int, int, np.ndarray]],
                 dec_tables: list[np.ndarray], dec_lens: list[int],
                 shared: list[tuple[list[int], np.ndarray]], t0: float) -> torch.Tensor:
        """The eager forward of a step: its index tensors, uploaded together, then the model
        (phases timed from t0, when the step's preparation began). Returns the logits
        [len(logits_idx), V] fp32."""
        bs = self.block_size
        parts = [np.asarray(ids, dtype=np.int64), positions, slots, np.asarray(logits_idx, dtype=np.int64)]
        parts += [table for *_, table in prefills]
        for rows, prefix in shared:
            parts += [np.asarray(rows, dtype=np.int64), prefix]
        if dec_tables:
            starts = np.zeros(len(dec_tables), dtype=np.int64)
            for rows, prefix in shared:
                starts[rows] = len(prefix)
            counts = np.fromiter((len(t) for t in dec_tables), np.int64, len(dec_tables)) - starts
            tables = np.zeros((len(dec_tables), int(counts.max())), dtype=np.int64)
            if shared or len(dec_tables) < VECTOR_DECODES:
                for i, t in enumerate(dec_tables):
                    tables[i, : counts[i]] = t[starts[i] :]
            else:  # every row's whole table, left-aligned, in one assignment
                tables[np.arange(tables.shape[1]) < counts[:, None]] = np.concatenate(dec_tables)
            parts += [tables, np.asarray(dec_lens) - starts * bs]
        dev = iter(self._upload(parts))  # taken in the order of parts
        input_ids, positions_t, slot_mapping, logits_indices = next(dev), next(dev), next(dev), next(dev)
        meta = AttnMeta(
            slot_mapping=slot_mapping, num_decodes=len(dec_tables), deterministic=self.deterministic,
            prefills=[PrefillChunk(q_start, q_len, ctx, next(dev)) for q_start, q_len, ctx, _ in prefills],
            shared=[SharedPrefix(next(dev), next(dev)) for _ in shared],
        )
        if dec_tables:
            meta.decode_block_tables, meta.decode_ctx_lens = next(dev), next(dev)
        t1 = time.perf_counter()
        self.phase_s["prepare"] += t1 - t0
        logits = self.model(input_ids, positions_t, meta, self.kv, logits_indices)
        self._forward_done(t1)
        return logits

    def _upload(self, parts: list[np.ndarray]) -> list[torch.Tensor]:
        """The int64 arrays as tensors of the same shapes on the device. On CUDA by one copy
        from pinned memory that does not wait for the device (a step's index tensors cost one
        transfer and no host sync); on CPU the arrays themselves, uncopied."""
        if self.device.type == "cpu":
            return [torch.from_numpy(a) for a in parts]
        sizes = [a.size for a in parts]
        host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
        np.concatenate([a.ravel() for a in parts], out=host.numpy())
        # NOTE: the caching host allocator hands `host` out again only after the copy is done
        dev = host.to(self.device, non_blocking=True)
        return [d.view(a.shape) for d, a in zip(dev.split(sizes), parts)]

    def _outputs(self, chunks: list[Chunk], spans: list, logits: torch.Tensor, masks=None) -> list:
        # logits: [S, V] fp32, the rows of every chunk's span in chunk order; masks: the
        # grammar masks of the sampled rows (grammar.grammar_masks) or None
        outs: list = [None] * len(chunks)
        rows: list[int] = []  # rows to sample, with their chunks
        sampled: list[int] = []
        r = 0
        for i, (c, span) in enumerate(zip(chunks, spans)):
            if span is None:
                continue
            n = span[1] - span[0]
            call = c.proc.call
            if isinstance(call, ScoreCall):
                outs[i] = score(logits[r : r + n], c.proc.token_ids, span, call)
            else:
                rows.append(r)
                sampled.append(i)
            r += n
        if rows:
            procs = [chunks[i].proc for i in sampled]
            picked = logits if len(rows) == len(logits) else logits[rows]
            params = [p.call.params for p in procs]
            histories = ([(p.token_ids, p.call.start_len) for p in procs]
                         if any(q.penalized for q in params) else None)
            token_ids, logprobs, tops = sample(picked, params, [p.rng for p in procs], histories,
                                               masks)
            for i, t, lp, top in zip(sampled, token_ids, logprobs, tops):
                outs[i] = (t, lp, top)
        return outs


# decodes a step from which their index arrays are built for all of them at once: below
# it the dozen array operations per session cost less than the batched ones' fixed cost
VECTOR_DECODES = 8
MIN_SHARED_BLOCKS = 4  # a shared prefix shorter than this is attended per session


def shared_prefixes(tables: list[np.ndarray], ctx_lens: list[int], block_size: int,
                    min_blocks: int = MIN_SHARED_BLOCKS) -> list[tuple[list[int], np.ndarray]]:
    """Groups of decodes whose tables start with the same physical blocks: (rows, the
    common leading blocks) for each group of two or more sharing at least min_blocks
    blocks that are full for every row. Rows are grouped by their first block."""
    by_head: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        by_head.setdefault(int(t[0]), []).append(i)
    out = []
    for rows in by_head.values():
        if len(rows) < 2:
            continue
        n = min(min(ctx_lens[i] for i in rows) // block_size, min(len(tables[i]) for i in rows))
        if n < min_blocks:
            continue
        head = np.stack([tables[i][:n] for i in rows])
        same = (head == head[0]).all(axis=0)
        common = n if same.all() else int(np.argmin(same))
        if common >= min_blocks:
            out.append((rows, head[0, :common].copy()))
    return out


def _num_vector_decodes(chunks: list[Chunk]) -> int:
    """How many of the leading one-token chunks (the step's decodes) _decode_indices
    takes: all of them from VECTOR_DECODES on, else none."""
    n = 0
    while n < len(chunks) and chunks[n].num_tokens == 1:
        n += 1
    return n if n >= VECTOR_DECODES else 0


def _decode_indices(dec: list[Chunk], page_slots: np.ndarray, bs: int, ids: list[int],
                    pos_parts: list[np.ndarray], slot_parts: list[np.ndarray]) -> tuple[
        list[np.ndarray], list[int]]:
    """The index arrays of a step's decodes (one-token chunks) in a few array operations
    for all of them, not a dozen per session (256 decodes: 1.8 -> 0.8 ms): their tokens,
    positions and KV slots appended to ids, pos_parts and slot_parts; returns their page
    tables (as device slots) and context lengths."""
    if not dec:
        return [], []
    ends = np.fromiter((c.end for c in dec), np.int64, len(dec))
    counts = (ends + bs - 1) // bs
    flat = page_slots[np.concatenate([c.proc.table.block_ids[:k]
                                      for c, k in zip(dec, counts.tolist())])]
    bounds = np.cumsum(counts)
    assert len(flat) == bounds[-1], "a decode's page table is shorter than its tokens"
    ids.extend(c.proc.token_ids[c.start] for c in dec)
    pos_parts.append(ends - 1)
    slot_parts.append(flat[bounds - 1] * bs + (ends - 1) % bs)
    lows = (bounds - counts).tolist()
    return [flat[a:b] for a, b in zip(lows, bounds.tolist())], ends.tolist()


def _logit_span(c: Chunk) -> tuple[int, int] | None:
    """The positions [lo, hi) of chunk c whose logits the step needs: the last one for a
    generate call that samples; for a score call, those predicting a scored token (and the
    last position when the call wants the next-token distribution)."""
    call = c.proc.call
    if isinstance(call, ScoreCall):
        n = c.proc.num_tokens
        lo = max(c.start, call.start - 1)
        hi = c.end if call.wants_dist else min(c.end, n - 1)
        return (lo, hi) if lo < hi else None
    return (c.end - 1, c.end) if c.sample else None


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
        out, idx = dst[d_idx[0] : d_idx[0] + n], _index(s_idx, src.device)
        if nb:
            out.copy_(src.index_select(0, idx), non_blocking=True)
        else:  # NOTE: gather straight into place: one pass over the bytes, not two
            torch.index_select(src, 0, idx, out=out)
    elif s_run:  # scatter from one source run
        part = src[s_idx[0] : s_idx[0] + n].to(dst.device, non_blocking=nb)
        dst.index_copy_(0, _index(d_idx, dst.device), part)
    else:
        part = src.index_select(0, _index(s_idx, src.device))
        dst.index_copy_(0, _index(d_idx, dst.device), part.to(dst.device, non_blocking=nb))


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block indices on `device`; on CUDA through pinned staging, so the host does not wait
    for the device (a swap is queued behind the step's compute)."""
    t = torch.tensor(ids, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


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
