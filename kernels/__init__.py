"""GPU kernels for serving early-exit LLMs over a paged KV cache.

Every kernel has a plain torch reference (``*_ref``) next to it; the public functions dispatch to
Triton for CUDA tensors (or CPU tensors with ``TRITON_INTERPRET=1``, or ``backend="triton"``) and
to the reference otherwise (or with ``backend="torch"``), so the pipeline also runs on CPU.

Paged KV cache contract: ``k_cache, v_cache (num_layers, num_blocks, block_size, num_kv_heads,
head_dim)``; ``block_tables`` int32 ``(batch, max_blocks_per_seq)``; ``context_lens`` int32
``(batch,)``; position ``p`` lives in block ``block_tables[b, p // block_size]`` at slot
``p % block_size``; ``slot_mapping`` int64 flat ids ``block * block_size + offset``.
"""

from ._common import HAVE_TRITON, use_triton
from .confidence import max_prob_argmax, max_prob_argmax_ref
from .fused_fill import fused_fill, fused_fill_ref, fused_fill_uses_kernel
from .gemv import MAX_ROWS as SKINNY_MAX_ROWS, skinny_linear, skinny_linear_ref
from .kv_store import store_kv, store_kv_ref
from .paged_attention import paged_decode_attention, paged_decode_attention_ref
from .prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from .rmsnorm import rmsnorm, rmsnorm_ref
from .rope_store import rotary_store_kv, rotary_store_kv_ref
from .rotary import apply_rotary, apply_rotary_ref, rotary_tables

__all__ = [
    "HAVE_TRITON", "use_triton",
    "paged_decode_attention", "paged_decode_attention_ref",
    "paged_prefill_attention", "paged_prefill_attention_ref",
    "store_kv", "store_kv_ref",
    "fused_fill", "fused_fill_ref", "fused_fill_uses_kernel",
    "rmsnorm", "rmsnorm_ref",
    "apply_rotary", "apply_rotary_ref", "rotary_tables",
    "rotary_store_kv", "rotary_store_kv_ref",
    "skinny_linear", "skinny_linear_ref", "SKINNY_MAX_ROWS",
    "max_prob_argmax", "max_prob_argmax_ref",
]
