"""Benchmark: the GPU executor's decode step on a preset's shape (llama2-7b unless --model), replay mode.

Sections (each row of the output table names its section):
  full     a decode step at full depth: batch 1 at context 512, batches 8..128 at contexts 512 and 2048
           (configurations whose KV cache does not fit next to the weights are skipped and listed);
           achieved TB/s = (weight bytes of the layers run + LM head + KV bytes read) / step time,
           and the fraction of the 2.98 TB/s floor (floor time / step time)
  exit     every decode row forced out at one exit layer (8 / 16 / 24) under fill: step time against
           the byte-count prediction and against eesim's analytical cost model for the same work
  check    exit-check overhead at batch 1 with 8 exits (7 checked, nobody leaves): max_prob (exit
           head each time) and cosine (no head), against the full rule (no checks)
  torch    a plain torch baseline: the same chain of linear layers (q, k, v, o, gate+up, down per layer)
           at the same batch sizes, eager and as one CUDA graph
  hf       what a user would run instead: Hugging Face transformers ``LlamaForCausalLM`` of the same shape
           (random bf16 weights built on the GPU, eesim's model freed first), ``generate()`` greedy from a
           512-token prompt; ms per decode step = (time of 64 new tokens - time of 1 new token) / 63,
           i.e. generate's prefill and set-up removed; eesim's speedup against its full-depth step at the
           same batch and context 512 (HF's context grows 512 -> 576 over the steps)
Times are medians over ``--repeats`` after ``--warmup`` steps, from CUDA events around
``GPUExecutor.execute`` (host work included: this is what a serving loop pays). Writes
``gpu_decode.csv`` and ``gpu_decode.md`` to $OUT when set.

Usage (H100):  python benchmarks/gpu_decode.py
       (CPU):  python benchmarks/gpu_decode.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eesim.kernels.gemv as gemv  # noqa: E402
from eesim.cost_model import AnalyticalCostModel  # noqa: E402
from eesim.exit_trace import synthesize_exit_trace  # noqa: E402
from eesim.gpu.executor import GPUExecutor  # noqa: E402
from eesim.gpu.weights import build_random_model  # noqa: E402
from eesim.hardware import HARDWARE_PRESETS  # noqa: E402
from eesim.model_spec import MODEL_PRESETS, ModelSpec  # noqa: E402
from eesim.request import Request, Sequence, Status  # noqa: E402
from eesim.scheduler import Scheduler, SchedulerConfig  # noqa: E402

FLOOR_BW = 2.98e12  # bytes/s: the H100's measured read bandwidth (HARDWARE_PRESETS["h100"])
BLOCK = 16


from eesim.forced_exits import ExitAt, NeverExit  # noqa: E402
from eesim.gpu.timing import time_call  # noqa: E402


def tiny_spec() -> ModelSpec:
    return ModelSpec("tiny", num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=8, mlp_size=704,
                     vocab_size=1024, exit_layers=tuple(range(1, 8)), dtype="float32", max_context=1024)


def tuned_config(path: str, default):
    """``kernels.gemv._config`` with the tiles of a bench_gemv ``--best-out`` file where it has the shape (rows
    bucketed to the swept 1 / 16 / 32 / 64), else ``default``."""
    table = {tuple(int(v) for v in key.split(",")): tuple(cfg) for key, cfg in json.loads(Path(path).read_text()).items()}

    def config(m: int, n: int, k: int):
        return table.get((gemv.tile_rows(m), n, k), default(m, n, k))
    return config


def decode_plan(ex: GPUExecutor, batch: int, ctx: int, spread: float = 0.0):
    """A scheduler holding ``batch`` sequences whose first ctx-1 positions are cached (full depth), and
    its plan for the next decode step (position ctx-1 of each). The cache content is left as is. ``spread``:
    the blocks drawn at random from that leading share of the pool (``BlockAllocator.scatter``), else
    consecutive."""
    spec = ex.spec
    sched = Scheduler(SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=max(batch, 16),
                                      block_size=ex.block_size), spec, ex.policy, ex.num_blocks)
    if spread:
        sched.allocator.scatter(spread)
    for i in range(batch):
        seq = Sequence(Request(i, 0.0, ctx - 1, 1 << 20))
        seq.num_computed, seq.num_generated = ctx - 1, 1
        seq.output_tokens = [i % spec.vocab_size]
        seq.blocks = sched.allocator.allocate(i, sched.allocator.blocks_for(ctx))
        seq.status = Status.RUNNING
        if ex.trace is not None:
            ex.prepare(seq, i % ex.trace.num_sequences)
        sched.ledger.add(i, ctx + 1)
        sched.ledger.record(i, 0, ctx - 1, spec.num_layers)
        sched.running.append(seq)
    plan = sched.schedule()
    assert plan.batch_size == batch and plan.can_exit.all(), "expected a pure decode plan"
    return sched, plan


def time_steps(ex, plan, warmup, repeats):
    for _ in range(warmup):
        ex.execute(plan)
    times = []
    for _ in range(repeats):
        out = ex.execute(plan)
        times.append(float(out.elapsed[0]))
    return float(np.median(times)), out


def step_bytes(spec: ModelSpec, batch: int, ctx: int, layers: int, fill_layers: int = 0, heads: int = 1) -> float:
    """Bytes a decode step must move: weights of the layers run, exit heads, KV read, fill's projections."""
    return (layers * spec.weight_bytes_per_layer + heads * spec.head_weight_bytes
            + batch * ctx * layers * spec.kv_bytes_per_token_per_layer
            + fill_layers * spec.kv_proj_weight_bytes_per_layer)


def torch_chain(ex: GPUExecutor, batch: int, warmup: int, repeats: int, graph: bool) -> float:
    """Median seconds of the plain linear chain (per layer: q, k, v, o, gate+up, silu*mul, down)."""
    w, spec = ex.weights, ex.spec
    x0 = torch.randn(batch, spec.hidden_size, device=ex.device, dtype=ex.dtype) * 0.1
    m = spec.mlp_size

    def chain(x):
        for layer in range(spec.num_layers):
            F.linear(x, w.wq[layer])
            F.linear(x, w.wk[layer])
            F.linear(x, w.wv[layer])
            x = F.linear(x, w.wo[layer]) * 0.5
            gu = F.linear(x, w.w_gate_up[layer])
            x = F.linear(F.silu(gu[:, :m]) * gu[:, m:], w.w_down[layer])
        return x

    cuda = ex.device.type == "cuda"
    run = lambda: chain(x0)  # noqa: E731
    if graph and cuda:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                chain(x0)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain(x0)
        run = g.replay
    times = time_call(run, warmup, repeats, cuda)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small shape (runs on CPU)")
    parser.add_argument("--model", default="llama2-7b",
                        choices=sorted(k for k, v in MODEL_PRESETS.items() if v.num_layers == 32),
                        help="the preset whose shape is timed (random weights; the sections' exits 8/16/24 need "
                             "32 layers)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="kernel backend: auto (default), torch or triton")
    parser.add_argument("--headroom-gb", type=float, default=6.0, help="GPU memory left free beside the KV cache")
    parser.add_argument("--sections", default="full,exit,check,torch",
                        help="comma list of: full, exit, check, torch, profile (batch-1 breakdown), micro")
    parser.add_argument("--hf-batches", default="1,16,64", help="batches of the hf section")
    parser.add_argument("--hf-new", type=int, default=64, help="new tokens per generate() in the hf section")
    parser.add_argument("--profile-batches", default="1", help="batches of the profile section (comma list)")
    parser.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    parser.add_argument("--batches", default="", help="batches of the full and torch sections (default 8,16,32,64,128)")
    parser.add_argument("--skinny-rows", default="",
                        help="full section once per value (comma list, e.g. 16,64,16,64 to alternate): the executor's "
                             "row limit for the skinny GEMM (cuBLAS above it); a value ending in t also takes the "
                             "tile configurations of --gemv-configs; default: the executor's own")
    parser.add_argument("--gemv-configs", default="", help="JSON from kernels/bench_gemv.py --best-out: the best "
                        "configuration per (rows 1/16/32/64, n, k), for the --skinny-rows values ending in t (its "
                        "1-row entries too, where it has them)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    t_begin = time.perf_counter()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        spec = tiny_spec()
        batches, contexts, exit_layers, fixed = [1, 4, 8], [64, 256], (2, 4, 6), 64
    else:
        spec = MODEL_PRESETS[args.model]
        batches, contexts, exit_layers, fixed = [8, 16, 32, 64, 128], [512, 2048], (8, 16, 24), 512
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    spec = ModelSpec(**{**{k: getattr(spec, k) for k in ("name", "num_layers", "hidden_size", "num_heads",
                                                          "num_kv_heads", "mlp_size", "vocab_size", "exit_layers",
                                                          "head_dim", "tied_embeddings", "max_context",
                                                          "rope_theta", "norm_eps")},
                        "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"})
    L = spec.num_layers
    t0 = time.perf_counter()
    model = build_random_model(spec, device, dtype, seed=0)
    configs = list(dict.fromkeys([(1, fixed)] + [(b, c) for c in contexts for b in batches]))
    kv_token = spec.kv_bytes_per_token
    if cuda:
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        # the executor stacks K/V weights and concatenates gate/up as views: no second copy
        budget = free - args.headroom_gb * 1e9
    else:
        budget = 8e9
    need = {cfg: cfg[0] * (-(-cfg[1] // BLOCK) + 1) * BLOCK * kv_token for cfg in configs}
    fits = [cfg for cfg in configs if need[cfg] <= budget]
    skipped = [cfg for cfg in configs if cfg not in fits]
    num_blocks = int(max(need[cfg] for cfg in fits) // (BLOCK * kv_token)) + 2
    trace = synthesize_exit_trace(L, spec.all_exits, 64, seed=0)
    ex = GPUExecutor(model, spec, "full", "fill", "max_prob", 0.9, mode="replay", trace=trace, device=device,
                     dtype=dtype, num_blocks=num_blocks, block_size=BLOCK, backend=args.backend,
                     cuda_graphs=cuda and not args.no_graphs)
    with torch.no_grad():
        ex.k_cache.normal_(0, 1)
        ex.v_cache.normal_(0, 1)
    print(f"{spec.name}: {L} layers, d={spec.hidden_size}, {dtype}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}; weights "
          f"{spec.weight_bytes / 1e9:.2f} GB, KV cache {2 * ex.k_cache.numel() * ex.k_cache.element_size() / 1e9:.1f} GB "
          f"({num_blocks} blocks); set-up {time.perf_counter() - t0:.1f} s")
    if skipped:
        print("skipped (KV cache would not fit beside the weights): "
              + ", ".join(f"batch {b} x ctx {c} ({need[(b, c)] / 1e9:.0f} GB)" for b, c in skipped))
    rows = []
    if ex.cuda_graphs:  # the graphed decode step must give exactly the eager one's results
        for label, rule, meas, batch in ((f"exit at layer {spec.all_exits[1]}", ExitAt(1), "max_prob", 8),
                                         ("full depth", "full", "max_prob", 1), ("full depth", "full", "max_prob", 8),
                                         ("7 checks cosine", NeverExit(), "cosine", 1)):
            ex.configure(spec, rule, "fill", meas, 0.9, "model", None)
            _, plan = decode_plan(ex, batch, fixed)
            results = []
            for graphs in (False, True, True):
                ex.cuda_graphs = graphs
                out = ex.execute(plan)
                results.append((out.tokens.copy(), out.exit_index.copy(),
                                ex.k_cache[:, plan.seqs[-1].blocks[-1]].clone(),
                                ex.v_cache[:, plan.seqs[-1].blocks[-1]].clone()))
            same = all(np.array_equal(results[0][0], r[0]) and np.array_equal(results[0][1], r[1])
                       and torch.equal(results[0][2], r[2]) and torch.equal(results[0][3], r[3]) for r in results[1:])
            print(f"CUDA graphs vs eager (model mode, batch {batch}, {label}, fill): "
                  f"{'identical' if same else 'DIFFERENT'} tokens, exits and K/V", flush=True)
            if not same:
                raise SystemExit("graphed decode differs from eager: not timing")

    def add(section, batch, ctx, layers, seconds, nbytes, predicted=None, note=""):
        floor = nbytes / FLOOR_BW
        row = dict(section=section, batch=batch, context=ctx, layers=layers, ms=seconds * 1e3,
                   tb_s=nbytes / seconds / 1e12, floor_ms=floor * 1e3, floor_frac=floor / seconds,
                   predicted_ms=None if predicted is None else predicted * 1e3, note=note)
        rows.append(row)
        pred = "" if predicted is None else f"  cost model {predicted * 1e3:7.3f} ms"
        print(f"{section:6s} B={batch:<4d} ctx={ctx:<5d} layers={layers:<3d} {seconds * 1e3:8.3f} ms  "
              f"{row['tb_s']:5.2f} TB/s  floor {floor * 1e3:7.3f} ms ({row['floor_frac']:.0%}){pred}  {note}",
              flush=True)

    default_config = gemv._config
    h100_cost = lambda s: AnalyticalCostModel(s, HARDWARE_PRESETS["h100"])  # noqa: E731

    if "full" in sections:
        ex.configure(spec, "full", "fill", "max_prob", 0.9, "replay", trace)
        default_rows = ex.skinny_rows
        for value in args.skinny_rows.split(",") if args.skinny_rows else [str(default_rows)]:
            rows_limit, tuned = int(value.rstrip("t")), value.endswith("t")
            ex.skinny_rows = rows_limit
            gemv._config = tuned_config(args.gemv_configs, default_config) if tuned else default_config
            ex._segment_graphs.reset()  # the graphs hold the products of the previous limit
            for batch, ctx in fits:
                _, plan = decode_plan(ex, batch, ctx)
                sec, out = time_steps(ex, plan, args.warmup, args.repeats)
                pred = float(h100_cost(spec).iteration_time(out.work)[0])
                add("full", batch, ctx, L, sec, step_bytes(spec, batch, ctx, L), pred,
                    note=f"skinny GEMM up to {min(rows_limit, gemv.MAX_ROWS)} rows{', tuned tiles' if tuned else ''}"
                    if args.skinny_rows else "")
        ex.skinny_rows = default_rows
        gemv._config = default_config
        ex._segment_graphs.reset()

    if "exit" in sections:
        for e in exit_layers:
            spec_e = spec.with_exits((e,))
            trace_e = synthesize_exit_trace(L, spec_e.all_exits, 16, seed=0)
            ex.configure(spec_e, ExitAt(0), "fill", "max_prob", 0.9, "replay", trace_e)
            for batch in ([1, 8, 32] if not args.tiny else [1, 4]):
                if (batch, fixed) not in fits and batch * fixed * kv_token > budget:
                    continue
                _, plan = decode_plan(ex, batch, fixed)
                sec, out = time_steps(ex, plan, args.warmup, args.repeats)
                assert (out.exit_index == 0).all()
                pred = float(h100_cost(spec_e).iteration_time(out.work)[0])
                add("exit", batch, fixed, e, sec, step_bytes(spec, batch, fixed, e, fill_layers=L - e), pred,
                    note=f"fill {L - e} layers")

    if "check" in sections:
        base_t = None
        for label, rule, meas in (("full rule", "full", "max_prob"), ("7 checks max_prob", NeverExit(), "max_prob"),
                                  ("7 checks cosine", NeverExit(), "cosine")):
            ex.configure(spec, rule, "fill", meas, 0.9, "replay", trace)
            _, plan = decode_plan(ex, 1, fixed)
            sec, out = time_steps(ex, plan, args.warmup, args.repeats)
            heads = 1 + (7 if meas == "max_prob" and rule != "full" else 0)
            pred = float(h100_cost(spec).iteration_time(out.work)[0])
            if base_t is None:
                base_t = sec
                note = label
            else:
                note = f"{label}: +{(sec - base_t) * 1e6 / (spec.num_exits - 1):.0f} us per check"
            add("check", 1, fixed, L, sec, step_bytes(spec, 1, fixed, L, heads=heads), pred, note=note)

    if "profile" in sections and cuda:
        for batch in (int(b) for b in args.profile_batches.split(",")):
            profile_step(ex, spec, trace, fixed, batch=batch)
    if "micro" in sections and cuda:
        micro(ex, spec)

    if "torch" in sections:
        for batch in [1, *batches]:
            for graph in ((False, True) if cuda else (False,)):
                sec = torch_chain(ex, batch, args.warmup, args.repeats, graph)
                nbytes = L * (spec.weight_bytes_per_layer - 2 * spec.hidden_size * spec.dtype_bytes)
                add("torch", batch, 0, L, sec, nbytes, note="linear chain, " + ("CUDA graph" if graph else "eager"))

    if "hf" in sections and cuda and not args.tiny:
        eesim_ms = {r["batch"]: r["ms"] for r in rows if r["section"] == "full" and r["context"] == fixed}
        del ex, model
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        hf_baseline(spec, [int(b) for b in args.hf_batches.split(",")], fixed, args.hf_new, eesim_ms, add)

    out_dir = os.environ.get("OUT")
    if out_dir:
        import pandas as pd

        frame = pd.DataFrame(rows)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        frame.to_csv(Path(out_dir) / "gpu_decode.csv", index=False)
        (Path(out_dir) / "gpu_decode.md").write_text(frame.to_markdown(index=False, floatfmt=".3f")
                                                     if _has_tabulate() else frame.to_string(index=False))
        print(f"wrote {out_dir}/gpu_decode.csv and .md")
    print(f"total {time.perf_counter() - t_begin:.0f} s")


def hf_baseline(spec: ModelSpec, batches: list[int], prompt: int, new: int, eesim_ms: dict, add) -> None:
    """Hugging Face ``LlamaForCausalLM.generate`` (greedy, dynamic cache, eager attention default) at the
    same shape; one row per batch with eesim's speedup in the note."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.mlp_size,
                      num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                      num_key_value_heads=spec.num_kv_heads, max_position_embeddings=max(4096, prompt + new + 8),
                      rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_theta, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    t0 = time.perf_counter()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    print(f"hf: transformers {transformers.__version__}, LlamaForCausalLM {sum(p.numel() for p in hf.parameters()) / 1e9:.2f} B "
          f"params, {next(hf.parameters()).dtype}, attn {hf.config._attn_implementation}; "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    L = spec.num_layers
    gen = torch.Generator(device="cuda").manual_seed(0)

    def timed(ids, n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(3, spec.vocab_size, (batch, prompt), device="cuda", generator=gen)
            timed(ids, 2)  # warm-up
            t1 = min(timed(ids, 1) for _ in range(2))
            tn = min(timed(ids, new) for _ in range(2))
            step = (tn - t1) / (new - 1)
            ctx = prompt + new // 2
            mine = eesim_ms.get(batch)
            note = f"HF generate, {new} new tokens" + (f"; eesim {mine:.3f} ms = {step * 1e3 / mine:.2f}x faster"
                                                      if mine else "")
            add("hf", batch, ctx, L, step, step_bytes(spec, batch, ctx, L), note=note)
    del hf
    torch.cuda.empty_cache()


def _category(name: str) -> str:
    n = name.lower()
    for cat, keys in (("attention", ("paged_decode", "split_reduce")), ("rmsnorm", ("rmsnorm",)),
                      ("rotary", ("rotary",)), ("store_kv", ("store_kv",)), ("fill", ("fill",)),
                      ("memcpy", ("memcpy", "memset")), ("gemm", ("gemm", "gemv", "cutlass", "sm90", "nvjet",
                                                                  "splitk", "cublas")),
                      ("softmax/reduce", ("softmax", "reduce", "max", "argmax"))):
        if any(k in n for k in keys):
            return cat
    return "elementwise/other"


def profile_step(ex: GPUExecutor, spec: ModelSpec, trace, ctx: int, steps: int = 5, batch: int = 1) -> None:
    """Where a decode step's time goes: kernel time per category (torch.profiler, CUDA activities), kernel
    count, device-idle time (event elapsed minus kernel time), host time. The checked rules at batch 1 only."""
    from torch.profiler import ProfilerActivity, profile

    for label, rule, meas in (("full rule", "full", "max_prob"), ("7 checks max_prob", NeverExit(), "max_prob"),
                              ("7 checks cosine", NeverExit(), "cosine")):
        if batch > 1 and rule != "full":
            continue
        ex.configure(spec, rule, "fill", meas, 0.9, "replay", trace)
        _, plan = decode_plan(ex, batch, ctx)
        for _ in range(3):
            ex.execute(plan)
        torch.cuda.synchronize()
        host, elapsed = [], []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                t0 = time.perf_counter()
                out = ex.execute(plan)
                host.append(time.perf_counter() - t0)
                elapsed.append(float(out.elapsed[0]))
            torch.cuda.synchronize()
        cats: dict[str, list[float]] = {}
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0)
            if t <= 0:
                continue
            c = cats.setdefault(_category(ev.key), [0.0, 0])
            c[0] += t / steps
            c[1] += ev.count / steps
        busy = sum(v[0] for v in cats.values())
        el = float(np.median(elapsed)) * 1e6
        print(f"profile B={batch} ctx={ctx} {label}: elapsed {el:7.0f} us, host {np.median(host) * 1e6:7.0f} us, "
              f"kernels {busy:7.0f} us in {sum(v[1] for v in cats.values()):.0f} launches, "
              f"device idle {el - busy:7.0f} us", flush=True)
        for name, (t, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
            print(f"    {name:18s} {t:8.1f} us  {n:6.0f} launches")
        if label == "full rule":
            top = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:8]
            for e in top:
                print(f"      {e.key[:80]:80s} {e.self_device_time_total / steps:8.1f} us x{e.count / steps:.0f}")
    ex.configure(spec, "full", "fill", "max_prob", 0.9, "replay", trace)


def micro(ex: GPUExecutor, spec: ModelSpec) -> None:
    """Achieved bandwidth of the batch-1 GEMVs (cuBLAS via F.linear) and of decode attention by
    partition size: what each piece of a step can reach on its own."""
    import triton.testing as tt

    from eesim.kernels import paged_decode_attention

    w, d = ex.weights, spec.hidden_size
    x = torch.randn(1, d, device=ex.device, dtype=ex.dtype)
    xm = torch.randn(1, spec.mlp_size, device=ex.device, dtype=ex.dtype)
    shapes = [("q", w.wq[0], x), ("o", w.wo[0], x), ("gate_up", w.w_gate_up[0], x), ("down", w.w_down[0], xm),
              ("head", ex.model.lm_head.weight, x)]
    if getattr(w, "wqkv", None) is not None:
        shapes.insert(0, ("qkv", w.wqkv[0], x))
    for name, W, inp in shapes:
        t = tt.do_bench(lambda: F.linear(inp, W), warmup=25, rep=100, return_mode="median") * 1e-3
        print(f"micro gemv {name:8s} {tuple(W.shape)}: {t * 1e6:7.1f} us  {W.numel() * 2 / t / 1e12:5.2f} TB/s")
    ctx = 512
    H, hd = spec.num_heads, spec.head_dim
    bt = torch.arange(32, device=ex.device, dtype=torch.int32)[None]
    cl = torch.tensor([ctx], device=ex.device, dtype=torch.int32)
    q = torch.randn(1, H, hd, device=ex.device, dtype=ex.dtype)
    kc, vc = ex.k_cache[0], ex.v_cache[0]
    nbytes = 2 * ctx * spec.num_kv_heads * hd * 2
    for ps in (512, 256, 128, 64, 32):
        t = tt.do_bench(lambda: paged_decode_attention(q, kc, vc, bt, cl, partition_size=ps, split=ps < 512),
                        warmup=25, rep=100, return_mode="median") * 1e-3
        print(f"micro attention B=1 ctx=512 partition {ps:4d}: {t * 1e6:6.1f} us  {nbytes / t / 1e12:5.2f} TB/s")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
