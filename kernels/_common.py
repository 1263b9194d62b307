"""Shared plumbing for the kernels: optional Triton import and backend dispatch.

Triton is optional so that the simulator (and every kernel's torch reference) runs on machines
without it. When it is missing, ``triton.jit`` becomes the identity and ``tl.constexpr`` a
placeholder, so kernel modules still import; only calling a Triton path then fails.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on Triton-less installs
    HAVE_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=None)

    class OutOfResources(Exception):  # never raised without Triton
        pass

try:  # programmatic dependent launch (Hopper+): griddepcontrol.wait / launch_dependents
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton: kernels only reference these under PDL=True
    HAVE_GDC = False
    gdc_launch_dependents = gdc_wait = None

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Decide between the Triton kernel and the torch reference.

    ``auto`` (the default) picks Triton for CUDA tensors, or for CPU tensors when the Triton
    interpreter is on; ``torch`` always uses the reference; ``triton`` forces the kernel.
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if not HAVE_TRITON:
        if backend == "triton":
            raise RuntimeError("backend='triton' requested but triton is not installed")
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "triton":
        if not (on_cuda or interpreting()):
            raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        return True
    return on_cuda or interpreting()


def pdl(device: torch.device) -> bool:
    """Whether to launch the decode chain's kernels with programmatic dependent launch.

    With PDL a kernel may start while the one before it drains: its programs read only what no kernel writes
    (weights) before ``gdc_wait`` and store nothing before it, so the next kernel's launch and first weight
    tiles overlap this one's tail (docs/benchmarks.md, "Programmatic dependent launch"). Needs compiled
    Triton on an NVIDIA GPU of compute capability 9.0+ (not ROCm, whose devices also say "cuda");
    ``EESIM_PDL=0`` turns it off (for A/B timing).
    """
    if not HAVE_GDC or device.type != "cuda" or interpreting() or os.environ.get("EESIM_PDL", "1") == "0" \
            or torch.version.hip is not None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def pdl_launch(use: bool) -> dict:
    """The launch option for ``use``: passed only when on (backends without PDL reject the option itself)."""
    return {"launch_pdl": True} if use else {}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def ieee_dot(dtype: torch.dtype) -> bool:
    """Whether kernels should upcast dot operands to fp32 and ask for IEEE precision.

    fp32 inputs would otherwise go through TF32 tensor cores on Ampere+ (10-bit mantissa), which
    breaks fp32-vs-reference comparisons. Under the interpreter, tl.dot on bf16 operands returns
    garbage (triton 3.9 CPU), so there bf16 operands are upcast too (after any rounding to bf16,
    so the numerics still match the GPU's bf16 tensor-core path).
    """
    return dtype == torch.float32 or interpreting()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only used to make the CPU/interpreter heuristics mirror the GPU


@functools.lru_cache(maxsize=None)
def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (the H100's 228 KB less a margin on the CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024) - 8 * 1024
    return 220 * 1024


def check_paged_attention(q, k_cache, v_cache) -> tuple[int, int, int, int]:
    """``q (rows, num_heads, head_dim)`` against one cache layer ``(blocks, block_size, num_kv_heads,
    head_dim)``: raises ValueError on a mismatch; returns (num_heads, head_dim, block_size, num_kv_heads)."""
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, hd = k_cache.shape
    if hd != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError("q / k_cache / v_cache head_dim or shapes disagree")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    return num_heads, head_dim, block_size, num_kv_heads
