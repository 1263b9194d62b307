"""Triton kernels vs their torch references.

By default runs on CPU under the Triton interpreter. With EESIM_KERNEL_TEST_DEVICE=cuda the same
tests run the compiled kernels on the GPU (inputs are still generated on CPU, then moved).
"""

import math
import os

DEVICE = os.environ.get("EESIM_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from eesim.kernels import (  # noqa: E402
    HAVE_TRITON,
    apply_rotary,
    apply_rotary_ref,
    fused_fill,
    fused_fill_ref,
    max_prob_argmax,
    max_prob_argmax_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    rmsnorm,
    rmsnorm_ref,
    rotary_store_kv,
    rotary_store_kv_ref,
    rotary_tables,
    SKINNY_MAX_ROWS,
    skinny_linear,
    skinny_linear_ref,
    store_kv,
    store_kv_ref,
)

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
BLOCK_SIZE = 16


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def paged_setup(batch_ctx, num_heads, num_kv_heads, head_dim, dtype, seed=0, spare_blocks=3):
    """Random q and cache with shuffled, non-contiguous block tables padded with -1."""
    g = gen(seed)
    blocks_per = [max(1, math.ceil(c / BLOCK_SIZE)) for c in batch_ctx]
    width = max(blocks_per) + 1  # one extra padding column for every sequence
    num_blocks = sum(blocks_per) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.full((len(batch_ctx), width), -1, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per):
        bt[b, :nb] = perm[used:used + nb]
        used += nb
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    q = torch.randn(len(batch_ctx), num_heads, head_dim, generator=g).to(dtype)
    kc = torch.randn(shape, generator=g).to(dtype)
    vc = torch.randn(shape, generator=g).to(dtype)
    ctx = torch.tensor(batch_ctx, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, kc, vc, bt, ctx))


HEAD_CONFIGS = [(6, 2, 64), (4, 4, 128), (8, 1, 64)]
CONTEXTS = [1, 17, 70]


# ----------------------------------------------------------------------------------- references

@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_CONFIGS)
def test_paged_attention_ref_matches_dense_sdpa(num_heads, num_kv_heads, head_dim):
    q, kc, vc, bt, ctx = paged_setup(CONTEXTS, num_heads, num_kv_heads, head_dim, torch.float32)
    out = paged_decode_attention_ref(q, kc, vc, bt, ctx)
    group = num_heads // num_kv_heads
    for b, n in enumerate(CONTEXTS):
        pos = torch.arange(n)
        blocks = bt[b, pos // BLOCK_SIZE].long()
        k = kc[blocks, pos % BLOCK_SIZE].transpose(0, 1).repeat_interleave(group, 0)  # (H, n, D)
        v = vc[blocks, pos % BLOCK_SIZE].transpose(0, 1).repeat_interleave(group, 0)
        dense = torch.nn.functional.scaled_dot_product_attention(q[b][:, None, :], k, v)[:, 0]
        torch.testing.assert_close(out[b], dense, rtol=1e-5, atol=1e-5)


def test_rotary_ref_matches_hf_rotate_half():
    g = gen(1)
    n, d = 5, 64
    cos, sin = rotary_tables(32, d)
    q, k = torch.randn(n, 6, d, generator=g), torch.randn(n, 2, d, generator=g)
    pos = torch.randint(0, 32, (n,), generator=g)

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    c = torch.cat([cos, cos], -1)[pos][:, None]
    s = torch.cat([sin, sin], -1)[pos][:, None]
    qr, kr = apply_rotary_ref(q, k, pos, cos, sin)
    torch.testing.assert_close(qr, q * c + rotate_half(q) * s)
    torch.testing.assert_close(kr, k * c + rotate_half(k) * s)


def fill_inputs(n, hidden, num_layers, kv_heads, head_dim, dtype, seed=0):
    g = gen(seed)
    num_blocks = max(4, -(-n // BLOCK_SIZE) + 1)  # a distinct slot per token
    h = torch.randn(n, hidden, generator=g).to(dtype)
    exit_layer = torch.randint(0, num_layers + 1, (n,), generator=g).to(torch.int32)
    exit_layer[0], exit_layer[-1] = 0, num_layers  # all layers skipped / none skipped
    positions = torch.randint(0, 50, (n,), generator=g)
    slot = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:n]
    norm_w = (1 + 0.1 * torch.randn(num_layers, hidden, generator=g)).to(dtype)
    wk = (torch.randn(num_layers, kv_heads * head_dim, hidden, generator=g) / hidden**0.5).to(dtype)
    wv = (torch.randn(num_layers, kv_heads * head_dim, hidden, generator=g) / hidden**0.5).to(dtype)
    cos, sin = rotary_tables(64, head_dim)
    cache_shape = (num_layers, num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    args = dict(h=h, exit_layer=exit_layer, positions=positions, slot=slot, input_norm_w=norm_w,
                wk=wk, wv=wv, cos=cos, sin=sin)
    return dict({k: v.to(DEVICE) for k, v in args.items()}, eps=1e-5), cache_shape


def test_fused_fill_ref_matches_composition_of_references():
    args, shape = fill_inputs(5, 96, 3, 2, 64, torch.float32)
    kc = torch.full(shape, float("nan"), device=DEVICE)
    vc = torch.full(shape, float("nan"), device=DEVICE)
    fused_fill_ref(**args, k_cache=kc, v_cache=vc)
    kc2, vc2 = kc.clone(), vc.clone()
    for n in range(5):
        for l in range(int(args["exit_layer"][n]), shape[0]):
            x = rmsnorm_ref(args["h"][n:n + 1], args["input_norm_w"][l], args["eps"])
            k = (x @ args["wk"][l].T).view(1, 2, 64)
            v = (x @ args["wv"][l].T).view(1, 2, 64)
            _, k = apply_rotary_ref(k, k, args["positions"][n:n + 1], args["cos"], args["sin"])
            store_kv_ref(k, v, kc2[l], vc2[l], args["slot"][n:n + 1])
    torch.testing.assert_close(kc, kc2, equal_nan=True)
    torch.testing.assert_close(vc, vc2, equal_nan=True)


# ------------------------------------------------------------------------------ paged attention

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_CONFIGS)
@pytest.mark.parametrize("split", [False, True])
def test_paged_attention_matches_ref(dtype, num_heads, num_kv_heads, head_dim, split):
    q, kc, vc, bt, ctx = paged_setup(CONTEXTS, num_heads, num_kv_heads, head_dim, dtype)
    out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(q, kc, vc, bt, ctx, partition_size=32, split=split, out=out,
                                 backend="triton")
    assert res.data_ptr() == out.data_ptr() and not out.isnan().any()
    ref = paged_decode_attention_ref(q, kc, vc, bt, ctx)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_n,warps,split", [(16, 2, False), (32, 8, True), (64, 4, True), (16, None, True)])
def test_paged_attention_tile_overrides(dtype, block_n, warps, split):
    """Other key tiles and warp counts (what kernels/bench_attention.py sweeps): the same attention."""
    q, kc, vc, bt, ctx = paged_setup(CONTEXTS + [130], 8, 2, 64, dtype, seed=5)
    out = paged_decode_attention(q, kc, vc, bt, ctx, partition_size=64, split=split, backend="triton",
                                 block_n=block_n, num_warps=warps)
    torch.testing.assert_close(out.float(), paged_decode_attention_ref(q, kc, vc, bt, ctx).float(), **TOL[dtype])
    # a key tile that does not divide the partition: the keys past it are masked
    odd = paged_decode_attention(q, kc, vc, bt, ctx, partition_size=48, split=True, backend="triton", block_n=32)
    torch.testing.assert_close(odd.float(), paged_decode_attention_ref(q, kc, vc, bt, ctx).float(), **TOL[dtype])
    with pytest.raises(ValueError, match="block_n"):
        paged_decode_attention(q, kc, vc, bt, ctx, partition_size=48, split=True, backend="triton", block_n=24)


@pytest.mark.parametrize("batch,kv_heads,bound,want", [
    (1, 32, 512, (32, 16, True, 32, 4)),  # batch 1: partitions down to 32 keys
    (1, 32, 2048, (128, 16, True, 64, 2)),
    (8, 32, 512, (256, 2, True, 64, 2)),  # 256 programs unsplit, fewer than two per SM: split
    (16, 32, 512, (512, 1, False, 64, 2)),  # enough programs: one per row and KV head, 2 warps
    (16, 32, 2048, (512, 4, True, 64, 2)),  # above BALANCE_ABOVE: split for mixed contexts
    (64, 8, 40, (48, 1, False, 16, 4)),  # a short bound: one program per row, 16 keys a step
])
def test_decode_attention_tiles(batch, kv_heads, bound, want):
    """The launch layout the rules pick (on a 132-SM H100), and the overrides."""
    from eesim.kernels.paged_attention import decode_tiles

    assert tuple(decode_tiles(batch, kv_heads, bound, 132)) == want
    forced = decode_tiles(batch, kv_heads, bound, 132, partition_size=64, split=True, block_n=128, num_warps=8)
    assert tuple(forced) == (64, -(-bound // 64), True, 128, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_tiles(batch, kv_heads, bound, 132, partition_size=40)


@needs_triton
def test_paged_attention_split_equals_nonsplit_and_auto():
    q, kc, vc, bt, ctx = paged_setup([70, 3, 129], 6, 2, 64, torch.float32, seed=3)
    whole = paged_decode_attention(q, kc, vc, bt, ctx, split=False, backend="triton")
    for psize in (16, 48, 64):
        parts = paged_decode_attention(q, kc, vc, bt, ctx, partition_size=psize, split=True,
                                       backend="triton")
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    # Auto: 3 * 2 programs cannot fill an H100, and the context bound spans 3 partitions of 64.
    auto = paged_decode_attention(q, kc, vc, bt, ctx, partition_size=64, backend="triton")
    torch.testing.assert_close(auto, whole, rtol=1e-5, atol=1e-5)


@needs_triton
def test_paged_attention_gqa_grouping():
    """Each query head must read its own KV head: make KV heads distinct and compare per head."""
    q, kc, vc, bt, ctx = paged_setup([17, 33], 6, 3, 64, torch.float32, seed=4)
    vc[:, :, 1] += 5.0  # KV head 1 shifts outputs of query heads 2, 3 only
    out = paged_decode_attention(q, kc, vc, bt, ctx, backend="triton")
    ref = paged_decode_attention_ref(q, kc, vc, bt, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (out[:, 2:4].mean() - out[:, [0, 1, 4, 5]].mean()) > 3.0


@needs_triton
def test_paged_attention_zero_context_gives_zeros():
    q, kc, vc, bt, ctx = paged_setup([5, 20], 4, 2, 64, torch.float32)
    ctx[0] = 0
    for split in (False, True):
        out = paged_decode_attention(q, kc, vc, bt, ctx, partition_size=16, split=split,
                                     backend="triton")
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, ctx))


def test_paged_attention_torch_backend_is_ref():
    q, kc, vc, bt, ctx = paged_setup(CONTEXTS, 6, 2, 64, torch.float32)
    out = paged_decode_attention(q, kc, vc, bt, ctx, backend="torch")
    assert torch.equal(out, paged_decode_attention_ref(q, kc, vc, bt, ctx))


# ------------------------------------------------------------------------------------- kv store

@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (3, 128)])
def test_store_kv_writes_only_targeted_slots(cache_dtype, kv_heads, head_dim):
    g = gen(5)
    num_blocks, n = 5, 7
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    kc = torch.randn(shape, generator=g).to(DEVICE, cache_dtype)
    vc = torch.randn(shape, generator=g).to(DEVICE, cache_dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=g).to(DEVICE)
    v = torch.randn(n, kv_heads, head_dim, generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:n]
    slots[3] = -1  # padding row: must not be written anywhere
    slots = slots.to(DEVICE)
    kc0, vc0 = kc.clone(), vc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    store_kv(k, v, kc, vc, slots, backend="triton")
    targeted = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool, device=DEVICE)
    targeted[slots[slots >= 0]] = True
    # fp32 -> bf16 stores round to nearest on GPU but truncate under the interpreter: allow 1 ulp.
    tol = dict(rtol=0, atol=0) if cache_dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    for cache, ref, orig in ((kc, kc_ref, kc0), (vc, vc_ref, vc0)):
        flat, flat_ref, flat0 = (c.view(-1, kv_heads, head_dim) for c in (cache, ref, orig))
        assert torch.equal(flat[~targeted], flat0[~targeted])  # untouched slots bit-identical
        torch.testing.assert_close(flat[targeted], flat_ref[targeted], **tol)
        assert (flat[targeted] != flat0[targeted]).all(-1).any(-1).all()  # every row rewritten


# ------------------------------------------------------------------------------------ fused fill

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,hidden,num_layers,kv_heads,head_dim",
                         [(5, 96, 3, 2, 64), (19, 130, 2, 1, 128)])
def test_fused_fill_matches_ref_and_writes_only_skipped_layers(dtype, n, hidden, num_layers,
                                                               kv_heads, head_dim):
    args, shape = fill_inputs(n, hidden, num_layers, kv_heads, head_dim, dtype, seed=n)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    fused_fill(**args, k_cache=kc, v_cache=vc, backend="triton")
    fused_fill_ref(**args, k_cache=kc_ref, v_cache=vc_ref)
    # Written set == (layer >= exit_layer, token's slot); everything else still NaN.
    expect = torch.zeros(shape[0], shape[1] * shape[2], dtype=torch.bool, device=DEVICE)
    for t in range(n):
        expect[int(args["exit_layer"][t]):, int(args["slot"][t])] = True
    for cache in (kc, vc):
        written = ~cache.view(shape[0], -1, kv_heads * head_dim).isnan()
        assert torch.equal(written.all(-1), expect) and torch.equal(written.any(-1), expect)
    tol = TOL[dtype]
    torch.testing.assert_close(kc.float(), kc_ref.float(), equal_nan=True, **tol)
    torch.testing.assert_close(vc.float(), vc_ref.float(), equal_nan=True, **tol)


@needs_triton
@pytest.mark.parametrize("end_layer", [0, 1, 2])
def test_fused_fill_end_layer_writes_only_up_to_it(end_layer):
    """copy_hidden's in-pass projection: layers exit_layer .. end_layer - 1 only."""
    n, hidden, num_layers, kv_heads, head_dim = 7, 96, 3, 2, 64
    args, shape = fill_inputs(n, hidden, num_layers, kv_heads, head_dim, torch.float32, seed=11)
    kc = torch.full(shape, float("nan"), device=DEVICE)
    vc = torch.full(shape, float("nan"), device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    fused_fill(**args, k_cache=kc, v_cache=vc, end_layer=end_layer, backend="triton")
    fused_fill_ref(**args, k_cache=kc_ref, v_cache=vc_ref, end_layer=end_layer)
    expect = torch.zeros(shape[0], shape[1] * shape[2], dtype=torch.bool, device=DEVICE)
    for t in range(n):
        expect[int(args["exit_layer"][t]):end_layer, int(args["slot"][t])] = True
    written = ~kc.view(shape[0], -1, kv_heads * head_dim).isnan()
    assert torch.equal(written.all(-1), expect)
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(vc, vc_ref, equal_nan=True, **TOL[torch.float32])
    with pytest.raises(ValueError, match="end_layer"):
        fused_fill(**args, k_cache=kc, v_cache=vc, end_layer=num_layers + 1, backend="triton")


@needs_triton
def test_fused_fill_no_skipped_layers_is_noop():
    args, shape = fill_inputs(4, 64, 2, 2, 64, torch.float32)
    args["exit_layer"][:] = shape[0]
    kc = torch.randn(shape, generator=gen(9)).to(DEVICE)
    vc = torch.randn(shape, generator=gen(10)).to(DEVICE)
    kc0, vc0 = kc.clone(), vc.clone()
    fused_fill(**args, k_cache=kc, v_cache=vc, backend="triton")
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,kv_heads,head_dim,exit_layer", [(96, 2, 64, 0), (130, 1, 128, 1), (1024, 2, 64, 2)])
def test_fused_fill_one_token_streams_like_the_skinny_gemm(dtype, hidden, kv_heads, head_dim, exit_layer):
    """One exited token takes the elementwise path (no tl.dot); int32 indices, as the executor stages
    them, and a first_layer at the token's exit (the launch skips the layers below)."""
    num_layers = 4
    args, shape = fill_inputs(1, hidden, num_layers, kv_heads, head_dim, dtype, seed=hidden)
    args["exit_layer"][:] = exit_layer
    args["positions"] = args["positions"].to(torch.int32)
    args["slot"] = args["slot"].to(torch.int32)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    fused_fill(**args, k_cache=kc, v_cache=vc, first_layer=exit_layer, backend="triton")
    fused_fill_ref(**args, k_cache=kc_ref, v_cache=vc_ref)
    assert not kc[exit_layer:].view(num_layers - exit_layer, -1, kv_heads * head_dim).isnan().all(-1).all(-1).any()
    torch.testing.assert_close(kc.float(), kc_ref.float(), equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(vc.float(), vc_ref.float(), equal_nan=True, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("n", [40, 70])
def test_fused_fill_wide_token_tiles_and_first_layer(n):
    """Tokens share one wide tile (the configurations above 16 and above 64 tokens); first_layer at the
    lowest exit leaves the layers below it alone."""
    hidden, num_layers, kv_heads, head_dim = 64, 4, 1, 64
    args, shape = fill_inputs(n, hidden, num_layers, kv_heads, head_dim, torch.float32, seed=5)
    args["exit_layer"] = args["exit_layer"].clamp(min=1)
    kc = torch.full(shape, float("nan"), device=DEVICE)
    vc = torch.full(shape, float("nan"), device=DEVICE)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    fused_fill(**args, k_cache=kc, v_cache=vc, first_layer=1, backend="triton")
    fused_fill_ref(**args, k_cache=kc_ref, v_cache=vc_ref)
    assert kc[0].isnan().all() and vc[0].isnan().all()
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, **TOL[torch.float32])
    torch.testing.assert_close(vc, vc_ref, equal_nan=True, **TOL[torch.float32])


@needs_triton
def test_fused_fill_uses_kernel_only_where_it_can():
    """Head sizes the kernel cannot take fall back to the reference (which the fill graphs must not capture)."""
    from eesim.kernels import fused_fill_uses_kernel

    h = torch.zeros(1, 8, device=DEVICE)
    for head_dim, want in ((64, True), (128, True), (16, False), (96, False)):
        cache = torch.zeros(1, 1, 16, 1, head_dim, device=DEVICE)
        assert fused_fill_uses_kernel(h, cache, "triton") is want
        assert fused_fill_uses_kernel(h, cache, "torch") is False


# ------------------------------------------------------------------------------ rmsnorm, rotary

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 96), (2, 5, 130), (2, 4099)])
def test_rmsnorm_matches_ref(dtype, shape):
    g = gen(11)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    out = torch.full_like(x, float("nan"))
    rmsnorm(x, w, 1e-5, out=out, backend="triton")
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), rmsnorm_ref(x, w, 1e-5).float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_CONFIGS)
def test_rotary_matches_ref(dtype, num_heads, num_kv_heads, head_dim):
    g = gen(12)
    n = 5
    cos, sin = rotary_tables(100, head_dim, device=DEVICE)
    q = torch.randn(n, num_heads, head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    pos = torch.randint(0, 100, (n,), generator=g).to(DEVICE)
    qo, ko = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    apply_rotary(q, k, pos, cos, sin, out=(qo, ko), backend="triton")
    assert not qo.isnan().any() and not ko.isnan().any()
    qr, kr = apply_rotary_ref(q, k, pos, cos, sin)
    torch.testing.assert_close(qo.float(), qr.float(), **TOL[dtype])
    torch.testing.assert_close(ko.float(), kr.float(), **TOL[dtype])
    # In place (out aliases the inputs) gives the same result.
    q2, k2 = q.clone(), k.clone()
    apply_rotary(q2, k2, pos, cos, sin, out=(q2, k2), backend="triton")
    assert torch.equal(q2, qo) and torch.equal(k2, ko)


@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_CONFIGS)
def test_rotary_store_kv_matches_rotary_then_store(cache_dtype, num_heads, num_kv_heads, head_dim):
    """Rotated Q out, rotated K and V in the cache at the row's slot; a padding row (slot -1) writes nothing."""
    g = gen(13)
    n, num_blocks = 6, 4
    cos, sin = rotary_tables(100, head_dim, device=DEVICE)
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(DEVICE, cache_dtype)
    pos = torch.randint(0, 100, (n,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=g)[:n]
    slots[2] = -1
    slots = slots.to(DEVICE)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    kc, vc = (torch.randn(shape, generator=g).to(DEVICE, cache_dtype) for _ in range(2))
    kc_ref, vc_ref, kc0, vc0 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q = rotary_store_kv(qkv, num_heads, num_kv_heads, pos, cos, sin, kc, vc, slots, backend="triton")
    q_ref = rotary_store_kv_ref(qkv, num_heads, num_kv_heads, pos, cos, sin, kc_ref, vc_ref, slots)
    # the reference is the composition of the two kernels' own references
    qr, _ = apply_rotary_ref(qkv[:, :num_heads * head_dim].view(n, num_heads, head_dim),
                             qkv[:, :num_heads * head_dim].view(n, num_heads, head_dim), pos, cos, sin)
    assert torch.equal(q_ref, qr)
    tol = TOL[cache_dtype]
    torch.testing.assert_close(q.float(), q_ref.float(), **tol)
    targeted = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool, device=DEVICE)
    targeted[slots[slots >= 0]] = True
    for cache, ref, orig in ((kc, kc_ref, kc0), (vc, vc_ref, vc0)):
        flat, flat_ref, flat0 = (c.view(-1, num_kv_heads, head_dim) for c in (cache, ref, orig))
        assert torch.equal(flat[~targeted], flat0[~targeted])
        torch.testing.assert_close(flat[targeted].float(), flat_ref[targeted].float(), **tol)
    # the torch backend is the reference itself
    kc2, vc2 = kc0.clone(), vc0.clone()
    assert torch.equal(rotary_store_kv(qkv, num_heads, num_kv_heads, pos, cos, sin, kc2, vc2, slots,
                                       backend="torch"), q_ref)
    assert torch.equal(kc2, kc_ref) and torch.equal(vc2, vc_ref)


def test_rotary_store_kv_refuses_mismatched_shapes():
    cos, sin = rotary_tables(16, 64)
    kc = torch.zeros(2, BLOCK_SIZE, 2, 64)
    with pytest.raises(ValueError, match="qkv has shape"):
        rotary_store_kv(torch.randn(3, 4 * 64), 4, 2, torch.zeros(3, dtype=torch.long), cos, sin, kc, kc.clone(),
                        torch.zeros(3, dtype=torch.long))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,act,res", [(1, 37, 100, None, False), (1, 64, 1536, "silu_mul", True),
                                           (3, 50, 70, None, True), (16, 33, 256, "silu_mul", False),
                                           (5, 16, 1024, None, False), (1, 130, 2048, None, True),
                                           (8, 97, 300, "silu_mul", True), (20, 70, 200, None, True),
                                           (33, 40, 96, "silu_mul", False), (64, 48, 160, None, True)])
def test_skinny_linear_matches_reference(dtype, m, n, k, act, res):
    g = gen(m * 1000 + n)
    x = torch.randn(m, 2 * k if act else k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype) if res else None
    x, w = x.to(DEVICE), w.to(DEVICE)
    r = r.to(DEVICE) if r is not None else None
    y = skinny_linear(x, w, r, act, backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), skinny_linear_ref(x, w, r, act).float(), **TOL[dtype])
    if m > 1:  # the weight tile as the dot's left operand (SWAP)
        ys = skinny_linear(x, w, r, act, config=(32, 64, 4, 2, 0, True), backend="triton")
        torch.testing.assert_close(ys.float(), skinny_linear_ref(x, w, r, act).float(), **TOL[dtype])
    # the torch fallback (backend="torch") computes the same thing
    torch.testing.assert_close(skinny_linear(x, w, r, act, backend="torch").float(),
                               skinny_linear_ref(x, w, r, act).float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (1, 64, 1536), (3, 50, 70), (16, 33, 256), (8, 96, 1024),
                                   (24, 40, 130), (57, 33, 64)])
def test_skinny_linear_glu_epilogue(dtype, m, n, k):
    """act="glu": silu(x @ gate.T) * (x @ up.T) from the [gate; up] weight, on both paths, against the fp32
    reference and against the unfused chain (the product rounded, then torch's silu and mul)."""
    g = gen(m * 31 + n)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(2 * n, k, generator=g) / math.sqrt(k)).to(dtype).to(DEVICE)
    want = skinny_linear_ref(x, w, act="glu")
    assert want.shape == (m, n)
    y = skinny_linear(x, w, act="glu", backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), want.float(), **TOL[dtype])
    if m == 1:  # and through tl.dot at one row
        y = skinny_linear(x, w, act="glu", config=(16, 64, 4, 2, 16), backend="triton")
        torch.testing.assert_close(y.float(), want.float(), **TOL[dtype])
    else:  # and with the weight tile as the dot's left operand
        ys = skinny_linear(x, w, act="glu", config=(32, 64, 4, 2, 0, True), backend="triton")
        torch.testing.assert_close(ys.float(), want.float(), **TOL[dtype])
    gu = (x.float() @ w.float().t()).to(dtype)
    chain = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    torch.testing.assert_close(y.float(), chain.float(), **TOL[dtype])
    torch.testing.assert_close(skinny_linear(x, w, act="glu", backend="torch").float(), want.float(), **TOL[dtype])
    with pytest.raises(ValueError, match="glu"):
        skinny_linear(x, w[:-1], act="glu")


@needs_triton
def test_skinny_linear_forced_dot_path_and_large_rows():
    g = gen(7)
    x = torch.randn(1, 200, generator=g).to(DEVICE)
    w = torch.randn(48, 200, generator=g).to(DEVICE)
    y = skinny_linear(x, w, config=(16, 64, 4, 2, 16), backend="triton")  # m=1 through tl.dot
    torch.testing.assert_close(y, skinny_linear_ref(x, w), **TOL[torch.float32])
    xm = torch.randn(20, 200, generator=g).to(DEVICE)  # a forced 16-row tile still covers all 20 rows
    for cfg in ((16, 64, 4, 2, 16), (32, 64, 4, 2, 16, True)):
        torch.testing.assert_close(skinny_linear(xm, w, config=cfg, backend="triton"), skinny_linear_ref(xm, w),
                                   **TOL[torch.float32])
    xb = torch.randn(SKINNY_MAX_ROWS + 3, 200, generator=g).to(DEVICE)  # above MAX_ROWS: torch path
    torch.testing.assert_close(skinny_linear(xb, w, backend="triton"), skinny_linear_ref(xb, w), **TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 1000), (3, 5003), (2, 37)])
def test_max_prob_argmax_matches_reference(dtype, rows, vocab):
    x = (torch.randn(rows, vocab, generator=gen(vocab)) * 4).to(dtype)
    x[0, vocab // 2] = x[0, 3] = x[0].max() + 1  # a tie: argmax must return the first index
    x = x.to(DEVICE)
    conf, idx = max_prob_argmax(x, backend="triton")
    cr, ir = max_prob_argmax_ref(x)
    assert idx.dtype == torch.int64 and conf.dtype == torch.float32
    assert torch.equal(idx.cpu(), ir.cpu()) and int(idx[0]) == 3
    torch.testing.assert_close(conf, cr, rtol=1e-5, atol=1e-6)


def test_pdl_only_compiled_on_a_gpu(monkeypatch):
    from eesim.kernels._common import pdl, pdl_launch

    assert not pdl(torch.device("cpu"))
    assert pdl_launch(False) == {}  # backends without PDL reject the launch option itself: passed only when on
    monkeypatch.setenv("EESIM_PDL", "0")
    assert not pdl(torch.device("cuda"))  # the switch is read before any device query


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="programmatic dependent launch needs compiled kernels on a GPU")
def test_pdl_chain_in_a_graph_equals_serial_launches(monkeypatch):
    """A chain of decode kernels, each reading the one before (norm, GEMV, GEMV + residual, GLU, down with
    the residual, max_prob), replayed in a CUDA graph with PDL gives bit for bit what serial launches give:
    no kernel reads its input before the previous kernel's stores land."""
    g = torch.Generator().manual_seed(7)
    d, inter, layers = 512, 1376, 12
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(torch.bfloat16).cuda()  # noqa: E731
    ln = [rnd(d, sc=0.1) + 1 for _ in range(layers)]
    w1 = [rnd(d, d, sc=d ** -0.5) for _ in range(layers)]
    w2 = [rnd(d, d, sc=d ** -0.5) for _ in range(layers)]
    wgu = [rnd(2 * inter, d, sc=d ** -0.5) for _ in range(layers)]
    wdn = [rnd(d, inter, sc=0.3 * inter ** -0.5) for _ in range(layers)]
    head = rnd(4000, d, sc=d ** -0.5)
    for rows in (1, 4):
        x = rnd(rows, d)

        def chain():
            h = x
            for i in range(layers):
                a = skinny_linear(rmsnorm(h, ln[i]), w1[i])
                h = skinny_linear(a, w2[i], h)
                h = skinny_linear(skinny_linear(rmsnorm(h, ln[i]), wgu[i], act="glu"), wdn[i], h)
            return max_prob_argmax(skinny_linear(h, head))

        outs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("EESIM_PDL", mode)
            chain()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                conf, idx = chain()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            outs[mode] = (conf.clone(), idx.clone())
        assert torch.isfinite(outs["1"][0]).all()
        assert torch.equal(outs["0"][0], outs["1"][0]) and torch.equal(outs["0"][1], outs["1"][1])
