"""CUDA graphs for decode steps: the forward of a decode-only step, captured once per shape
and replayed.

An eager decode step launches hundreds of small kernels, and at small batches launching
them costs more than running them. A decode-only step is padded to the next batch bucket
and its block tables to the next width bucket; its inputs are copied into static buffers
(one host-to-device copy) and the graph captured for that (batch, width) is replayed,
writing fp32 logits into a static output. Sampling runs after, outside the graph.

Padded rows are harmless: token 0 at position 0, its K/V written to a scratch slot that no
session maps (the KV pool's extra last block, see ModelRunner), attending to the first slot
of block 0 only (context length 1, table all zeros): a read of finite values, and their
logits are never looked at.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np
import torch

from agentos.kernel.runner.attention import AttnMeta

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
WARMUP_RUNS = 2  # eager runs before a capture: lazy initialisation must not happen inside it
# NOTE: cascade attends a shared prefix once instead of once per row; when that skips at
# least this fraction of the KV blocks a step reads, it beats the launches a graph saves
# (cascade's groups vary per step, so it runs eagerly). Not yet tuned on a GPU.
CASCADE_MIN_SAVED = 0.5


class CaptureError(RuntimeError):
    """A decode step could not be captured as a CUDA graph (nothing was changed but the
    scratch slot)."""


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes graphs are captured for: BATCH_BUCKETS below max_batch_size, then
    max_batch_size itself (at most the largest bucket; larger batches run eagerly)."""
    cap = min(max_batch_size, BATCH_BUCKETS[-1])
    return [b for b in BATCH_BUCKETS if b < cap] + [cap]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows; None when n is larger than every bucket."""
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def width_bucket(num_blocks: int, max_blocks: int) -> int | None:
    """The block-table width of the graph for tables of up to num_blocks (>= 1) blocks: the
    next power of two, capped at max_blocks; None when num_blocks > max_blocks.

    NOTE: one graph per (batch, width) rather than one width of max_blocks for all: the
    torch decode attention gathers every block of the table width, so its cost follows the
    width, and a fixed max width would make every step pay for the longest context the
    model allows (512 blocks at 8k tokens). Powers of two waste at most 2x the longest row
    of the step, with log2(max_blocks) + 1 widths, captured only when used; the tables
    themselves are tiny (batch * width int64s)."""
    if num_blocks > max_blocks:
        return None
    return min(1 << (num_blocks - 1).bit_length(), max_blocks)


def prefers_cascade(groups: list[tuple[list[int], np.ndarray]], tables: list[np.ndarray]) -> bool:
    """Whether the shared prefixes `groups` (of runner.shared_prefixes) over the decode
    tables skip at least CASCADE_MIN_SAVED of the blocks the step's attention reads."""
    saved = sum((len(rows) - 1) * len(prefix) for rows, prefix in groups)
    return saved >= CASCADE_MIN_SAVED * sum(len(t) for t in tables)


def input_views(buf, batch: int, width: int) -> tuple:
    """(input ids [batch], positions [batch], slot mapping [batch], context lengths [batch],
    block tables [batch, width]) as views of the 1-d int64 buffer buf (numpy or torch), in
    the packed layout of a (batch, width) graph: 4 * batch + batch * width entries."""
    b = batch
    return (buf[:b], buf[b : 2 * b], buf[2 * b : 3 * b], buf[3 * b : 4 * b],
            buf[4 * b : 4 * b + b * width].reshape(b, width))


def pad_decode(buf: np.ndarray, ids, positions, slots, tables: list[np.ndarray], ctx_lens,
               batch: int, width: int, scratch_slot: int) -> None:
    """Writes the inputs of n <= batch decodes into buf in the layout of input_views,
    padded to `batch` rows of tables `width` blocks wide. Padded rows: token 0 at position
    0 writing to scratch_slot, context length 1, table all zeros (block 0)."""
    n = len(ids)
    b_ids, b_pos, b_slots, b_lens, b_tables = input_views(buf, batch, width)
    b_ids[:n], b_ids[n:] = ids, 0
    b_pos[:n], b_pos[n:] = positions, 0
    b_slots[:n], b_slots[n:] = slots, scratch_slot
    b_lens[:n], b_lens[n:] = ctx_lens, 1
    b_tables[:] = 0
    for row, table in zip(b_tables, tables):
        row[: len(table)] = table


class DecodeGraphs:
    """The captured decode steps of one model and KV pool, keyed by (batch, width) bucket.

    All graphs share one memory pool (they never run concurrently) and one set of static
    buffers: inputs in the packed layout of input_views, sized for the largest graph, and
    the logits [largest batch bucket, vocab] fp32.
    """

    def __init__(self, model, max_batch_size: int, max_blocks: int, scratch_slot: int, device):
        self.model = model
        self.buckets = batch_buckets(max_batch_size)
        self.max_blocks = max_blocks
        self.scratch_slot = scratch_slot
        self.device = torch.device(device)
        self.num_captured = 0
        self.num_replays = 0
        self.clear()

    def clear(self) -> None:
        """Drops every graph and static buffer; later steps capture again. Call before the KV
        pool or the weights move: a graph holds their addresses."""
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._inputs: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None

    def run(self, kv: torch.Tensor, ids: list[int], positions: np.ndarray, slots: np.ndarray,
            tables: list[np.ndarray], ctx_lens: list[int]) -> torch.Tensor | None:
        """Runs a decode-only step of n = len(ids) sessions through the graph of its shape,
        capturing it first when new: writes the step's K/V into kv.

        Returns the logits [n, V] fp32, a view of the static output that the next run
        overwrites; or None, changing nothing, when the step is larger than every graph (too
        many decodes, or a table wider than max_blocks): run it eagerly then.
        """
        n = len(ids)
        batch = bucket_for(n, self.buckets)
        width = width_bucket(max(len(t) for t in tables), self.max_blocks)
        if batch is None or width is None:
            return None
        if self._inputs is None:
            self._alloc()
        graph = self._graphs.get((batch, width))
        if graph is None:
            try:
                graph = self._capture(batch, width, kv)
            except Exception as e:  # an op that cannot be captured: the caller runs eagerly
                raise CaptureError(f"batch {batch}, width {width}: {type(e).__name__}: {e}") from e
            self._graphs[batch, width] = graph
            self.num_captured += 1
        host = torch.empty(4 * batch + batch * width, dtype=torch.int64,
                           pin_memory=self.device.type == "cuda")
        pad_decode(host.numpy(), ids, positions, slots, tables, ctx_lens, batch, width,
                   self.scratch_slot)
        # NOTE: from pinned memory without waiting for the device; the caching host
        # allocator hands this buffer out again only after the copy is done
        self._inputs[: len(host)].copy_(host, non_blocking=True)
        graph.replay()
        self.num_replays += 1
        return self._logits[:n]

    def _alloc(self) -> None:
        top = self.buckets[-1]
        dev = self.device
        self._inputs = torch.zeros(4 * top + top * self.max_blocks, dtype=torch.int64, device=dev)
        self._logits = torch.zeros(top, self.model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self._rows = torch.arange(top, device=dev)  # every row's logits

    def _forward(self, batch: int, width: int, kv: torch.Tensor):
        """The step a (batch, width) graph records: the model over the static inputs, its
        logits copied into the static output (captured, its temporaries live in the pool)."""
        ids, positions, slots, ctx_lens, tables = input_views(self._inputs, batch, width)
        meta = AttnMeta(slot_mapping=slots, num_decodes=batch, decode_block_tables=tables,
                        decode_ctx_lens=ctx_lens)
        out, rows = self._logits[:batch], self._rows[:batch]
        return lambda: out.copy_(self.model(ids, positions, meta, kv, rows))

    def _capture(self, batch: int, width: int, kv: torch.Tensor) -> torch.cuda.CUDAGraph:
        # NOTE: warmed up and captured over padding only: the warmup runs execute for real,
        # and padding writes nothing but the scratch slot. The step's own inputs come after.
        host = np.empty(4 * batch + batch * width, dtype=np.int64)
        pad_decode(host, [], [], [], [], [], batch, width, self.scratch_slot)
        self._inputs[: len(host)].copy_(torch.from_numpy(host))
        forward = self._forward(batch, width, kv)
        with torch.cuda.device(self.device):  # capture begins on the current device's stream
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # as torch.cuda.graphs asks: warm up off the main stream
                for _ in range(WARMUP_RUNS):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                forward()
        return graph
