"""Prefill (chunked, causal) attention over the paged KV cache: Triton kernel vs torch reference.

By default runs on CPU under the Triton interpreter, with 16x16 tiles so that sequences span
several row and key tiles while staying small. With EESIM_KERNEL_TEST_DEVICE=cuda the same tests
run the compiled kernel on the GPU (inputs are still generated on CPU, then moved).
"""

import math
import os

DEVICE = os.environ.get("EESIM_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch
from hypothesis import given, settings, strategies as st

from eesim.kernels import HAVE_TRITON, paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
TILES = dict(block_m=16, block_n=16)  # small tiles: several row and key tiles per sequence


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def chunk(prefix: int, rows: int) -> list[int]:
    """Positions of a prompt chunk of ``rows`` tokens after ``prefix`` cached ones."""
    return list(range(prefix, prefix + rows))


def prefill_setup(seq_positions, num_heads, num_kv_heads, head_dim, dtype, block_size, seed=0,
                  pos_dtype=torch.int32, spare_blocks=3):
    """Random q and cache; shuffled block tables, zero padded, one extra column per sequence.

    ``seq_positions[c]`` lists the positions of sequence c's rows (possibly empty). Every block of
    the cache holds random K/V, so reading a wrong slot, page or head shows up in the output.
    """
    g = gen(seed)
    ctx = [max(p) + 1 if p else 0 for p in seq_positions]
    blocks_per = [math.ceil(c / block_size) for c in ctx]
    width = max(blocks_per) + 1
    num_blocks = sum(blocks_per) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.zeros(len(seq_positions), width, dtype=torch.int32)
    used = 0
    for c, nb in enumerate(blocks_per):
        bt[c, :nb] = perm[used:used + nb]
        used += nb
    counts = torch.tensor([len(p) for p in seq_positions])
    cu = torch.zeros(len(seq_positions) + 1, dtype=torch.int32)
    cu[1:] = counts.cumsum(0)
    positions = torch.tensor([x for p in seq_positions for x in p], dtype=pos_dtype)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q = torch.randn(int(cu[-1]), num_heads, head_dim, generator=g).to(dtype)
    kc = torch.randn(shape, generator=g).to(dtype)
    vc = torch.randn(shape, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (q, kc, vc, bt, cu, positions))


def check(args, max_rows, dtype, **tiles):
    out = paged_prefill_attention(*args, max_rows, backend="triton", **tiles)
    ref = paged_prefill_attention_ref(*args, max_rows)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    return out


# Mixed batch: a fresh prompt, a chunk after a cached prefix, an empty (CUDA-graph padding)
# sequence, a chunk spanning three 16-row tiles, and a single decode-like row.
MIXED = [chunk(0, 20), chunk(21, 13), [], chunk(5, 37), chunk(50, 1)]


# ------------------------------------------------------------------------------------ kernel


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size",
                         [(4, 2, 16, 16), (4, 4, 24, 3), (6, 2, 16, 1)])
def test_prefill_matches_ref(dtype, num_heads, num_kv_heads, head_dim, block_size):
    args = prefill_setup(MIXED, num_heads, num_kv_heads, head_dim, dtype, block_size, seed=1)
    check(args, 48, dtype, **TILES)  # max_rows bucket above the largest chunk (37)


@needs_triton
def test_prefill_fp16_and_int64_positions():
    args = prefill_setup(MIXED, 4, 2, 16, torch.float16, 16, seed=2, pos_dtype=torch.int64)
    check(args, 37, torch.float16, **TILES)


@needs_triton
@pytest.mark.parametrize("block_size", [16, 3])
def test_prefill_noncontiguous_positions(block_size):
    # Recomputed tokens: gaps inside a row tile, a tile whose smallest position has whole
    # unmasked key tiles below it while its largest reaches far past them, and a last tile of
    # one row. The skipped positions' K/V are in the cache and must still be attended. The last
    # sequence is not even sorted (the kernel bounds each tile by its min and max position).
    seqs = [[5, 9, 10], [0, 2, 40, 41, 63], list(range(3, 40, 2)), [], [17, 18, 60], [30, 3, 7]]
    args = prefill_setup(seqs, 4, 2, 16, torch.float32, block_size, seed=3)
    check(args, 20, torch.float32, **TILES)


@needs_triton
def test_prefill_default_tiles():
    # Default 64x64 tiles, rows of one sequence spanning two row tiles, head_dim 128.
    args = prefill_setup([chunk(30, 70), chunk(0, 5), []], 2, 1, 128, torch.float32, 16, seed=4)
    check(args, 128, torch.float32)


@needs_triton
def test_prefill_gqa_grouping():
    """Each query head must read its own KV head: make KV heads distinct and compare per head."""
    q, kc, vc, bt, cu, pos = prefill_setup([chunk(3, 20), chunk(0, 9)], 6, 3, 16, torch.float32, 16,
                                           seed=5)
    vc[:, :, 1] += 5.0  # KV head 1 shifts outputs of query heads 2, 3 only
    out = check((q, kc, vc, bt, cu, pos), 20, torch.float32, **TILES)
    assert (out[:, 2:4].mean() - out[:, [0, 1, 4, 5]].mean()) > 3.0


@needs_triton
def test_prefill_matches_dense_causal_attention_of_contiguous_prompt():
    """Independent check: a dense fp64 causal attention of a 40-token prompt (no paging) equals the
    kernel on that prompt scattered into a shuffled paged cache, in one call or in two chunks."""
    g = gen(6)
    n, heads, kv_heads, d, page = 40, 4, 2, 24, 3
    q = torch.randn(n, heads, d, generator=g)
    k = torch.randn(n, kv_heads, d, generator=g)
    v = torch.randn(n, kv_heads, d, generator=g)
    kv_of_head = torch.arange(heads) // (heads // kv_heads)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k[:, kv_of_head].double()) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[:, kv_of_head].double()).float()

    num_blocks = math.ceil(n / page) + 4
    blocks = torch.randperm(num_blocks, generator=g)[: math.ceil(n / page)]
    kc = torch.randn(num_blocks, page, kv_heads, d, generator=g)  # unused slots hold noise
    vc = torch.randn(num_blocks, page, kv_heads, d, generator=g)
    p = torch.arange(n)
    kc[blocks[p // page], p % page] = k
    vc[blocks[p // page], p % page] = v
    bt = blocks.to(torch.int32)[None]
    kc, vc, bt = kc.to(DEVICE), vc.to(DEVICE), bt.to(DEVICE)

    def run(rows):
        cu = torch.tensor([0, len(rows)], dtype=torch.int32, device=DEVICE)
        return paged_prefill_attention(q[rows].to(DEVICE), kc, vc, bt, cu, p[rows].to(DEVICE),
                                       len(rows), backend="triton", **TILES).cpu()

    whole = run(p)
    chunked = torch.cat([run(p[:23]), run(p[23:])])
    torch.testing.assert_close(whole, dense, **TOL[torch.float32])
    torch.testing.assert_close(chunked, dense, **TOL[torch.float32])


@needs_triton
@settings(max_examples=25, deadline=None)
@given(data=st.data(), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       head_dim=st.sampled_from([16, 20]), block_size=st.sampled_from([1, 5, 16]))
def test_prefill_property_matches_ref(data, kv_heads, group, head_dim, block_size):
    seqs = []
    for _ in range(data.draw(st.integers(1, 3), label="num_seqs")):
        prefix = data.draw(st.integers(0, 40), label="prefix")
        steps = data.draw(st.lists(st.integers(1, 4), max_size=34), label="position steps")
        seqs.append([prefix + sum(steps[:i]) for i in range(len(steps))])
    max_rows = max(1, *(len(p) for p in seqs)) + data.draw(st.integers(0, 20), label="bucket slack")
    args = prefill_setup(seqs, kv_heads * group, kv_heads, head_dim, torch.float32, block_size,
                         seed=data.draw(st.integers(0, 2**16), label="seed"))
    check(args, max_rows, torch.float32, **TILES)


# -------------------------------------------------------------------------- reference, dispatch


def test_prefill_torch_backend_is_ref():
    args = prefill_setup(MIXED, 4, 2, 16, torch.float32, 16, seed=7)
    out = paged_prefill_attention(*args, 37, backend="torch")
    assert torch.equal(out, paged_prefill_attention_ref(*args, 37))


def test_prefill_ref_rows_are_sdpa_of_their_own_prefix():
    """Reference sanity on one row per sequence: plain softmax over that row's keys 0..pos."""
    seqs = [[5, 9, 10], chunk(2, 4)]
    q, kc, vc, bt, cu, pos = prefill_setup(seqs, 4, 2, 16, torch.float32, 3, seed=8)
    out = paged_prefill_attention_ref(q, kc, vc, bt, cu, pos, 4)
    for c, r in ((0, 1), (1, 5)):  # row 1 is at position 9; row 5 at position 4
        keys = torch.arange(int(pos[r]) + 1)
        kv_rows = (bt[c, keys // 3].long(), keys % 3)
        for h in range(4):
            k, v = kc[kv_rows][:, h // 2], vc[kv_rows][:, h // 2]
            w = torch.softmax(k @ q[r, h] / 4.0, 0)
            torch.testing.assert_close(out[r, h], w @ v, rtol=1e-5, atol=1e-5)


@needs_triton
def test_prefill_rejects_bad_arguments():
    args = prefill_setup([chunk(0, 4)], 4, 2, 16, torch.float32, 16)
    with pytest.raises(ValueError, match="power of two"):
        paged_prefill_attention(*args, 4, backend="triton", block_m=24)
    with pytest.raises(ValueError, match="power of two"):
        paged_prefill_attention(*args, 4, backend="triton", block_n=8)
    q, kc, vc, bt, cu, pos = args
    with pytest.raises(ValueError, match="cu_rows"):
        paged_prefill_attention(q, kc, vc, bt, cu[:1], pos, 4, backend="triton")
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_prefill_attention(q[:, :3], kc, vc, bt, cu, pos, 4, backend="triton")
