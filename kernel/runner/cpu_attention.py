"""Paged decode attention on the CPU, in C++: the fast path of `attention.paged_attention`
for a step's decodes on CPU tensors.

The torch path gathers each sequence's blocks into a contiguous copy, then runs SDPA over
it: at batch 32 that moves the whole context through memory three times a layer (read,
write, read again) and is 85% of a tiny-model decode step. cpu_attention.cpp reads K and V
once, in place, through the block table.

Built on first use with the system C++ compiler (`$CXX`, else c++ or g++; `-O3
-march=native -fopenmp`) into `~/.cache/agentos/kernels` (`$AGENTOS_KERNEL_CACHE`), keyed by
the source, the compiler and this CPU's flags, and loaded with ctypes, which lets go of the
GIL for the call. The library takes OpenMP from the process (torch's libgomp, already
loaded), so it shares torch's threads rather than starting a second pool.

When no compiler is found or the build fails, `available()` is False (one warning) and the
torch path runs; so it does under AGENTOS_ATTENTION=torch (to compare the two).
Supported: float32 and bfloat16, any head dim, grouped-query heads, sliding windows,
soft-capped scores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("agentos.attention")

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BUILD_TIMEOUT_S = 300
_ARGS = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int64,
                                                          ctypes.c_float, ctypes.c_int64,
                                                          ctypes.c_int]
TASKS_PER_THREAD = 2  # a batch smaller than threads * this splits each sequence's keys
MIN_SPLIT_TOKENS = 256  # but into ranges of at least this many keys
_FUNCTIONS = {torch.float32: "agentos_decode_f32", torch.bfloat16: "agentos_decode_bf16"}


def available() -> bool:
    """True when the library is built (building it now if needed)."""
    return _library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """True when decode() takes these: CPU tensors of a supported dtype, each block of the
    caches one contiguous [block_size, KVH, D] run, K and V strided alike."""
    if q.device.type != "cpu" or q.dtype not in _FUNCTIONS or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype or v_cache.shape != k_cache.shape or q.shape[0] == 0:
        return False
    _, bs, kvh, d = k_cache.shape
    inner = (kvh * d, d, 1)
    return (k_cache.stride()[1:] == inner and v_cache.stride() == k_cache.stride()
            and q.shape[1] % kvh == 0 and q.shape[2] == d)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_tables: torch.Tensor, ctx_lens: torch.Tensor, scale: float,
           window: int | None = None, cap: float | None = None) -> torch.Tensor:
    """One query per sequence, q [B, H, D], over the first ctx_lens[b] keys of its blocks
    block_tables [B, max_blocks]; returns [B, H, D]. The caller checked `supports`.
    Raises IndexError, reading nothing, when a context length is below 1 or past its
    table, or a block id it reaches is outside the caches."""
    lib = _library()
    assert lib is not None, "decode() called without available()"
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = ctx_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    B, H, D = q.shape
    _, bs, kvh, _ = k_cache.shape
    threads = torch.get_num_threads()
    splits = max(1, min(-(-threads * TASKS_PER_THREAD // B),
                        tables.shape[1] * bs // MIN_SPLIT_TOKENS))
    bad = getattr(lib, _FUNCTIONS[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        lens.data_ptr(), out.data_ptr(), B, H, kvh, D, bs, k_cache.shape[0], tables.shape[1],
        k_cache.stride(0), scale, window or 0, cap or 0.0, splits, threads)
    if bad:
        raise IndexError("paged decode: a context length or block id outside the table or pool")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the CPU attention kernel is unavailable (%s); using the torch path", e)
        return None
    for name in _FUNCTIONS.values():
        getattr(lib, name).argtypes = _ARGS
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _build() -> Path:
    """The built library's path, compiling it when this source, compiler and CPU have none
    yet. Raises RuntimeError when there is no compiler or it fails."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *FLAGS, _compiler_version(cxx),
                                             _cpu_flags()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("AGENTOS_KERNEL_CACHE")
                 or Path.home() / ".cache" / "agentos" / "kernels")
    target = cache / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # NOTE: built beside the target, then renamed: concurrent builders never load half a file
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


@functools.cache
def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    return proc.stdout.splitlines()[0] if proc.stdout else ""


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's flags (Linux), else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()
