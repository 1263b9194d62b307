"""GPU correctness check (not a benchmark): the executor's compiled kernels against its torch references.

The CPU tests check every kernel under TRITON_INTERPRET=1 and the executor's paths with the torch
references; this runs the same work on CUDA with compiled Triton kernels and CUDA graphs, so a
compiler or graph-capture problem on the real GPU shows up before any timing is trusted:

1. each kernel against its reference on random inputs at a 7B-like shape (bf16);
2. a small random model served through the Scheduler with forced exits (every KV policy; graphs on
   and off, and on with graphed_owing; prompts long enough for several prefill chunks and block boundaries): the tokens and exit
   layers equal the CPU torch run, and the paged caches agree.

Usage:  PYTHONPATH=$PWD python benchmarks/gpu_check.py     (exit status 1 on any mismatch)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.forced_exits import RandomExits  # noqa: E402
from eesim.gpu.executor import GPUExecutor, run_plans  # noqa: E402
from eesim.gpu.weights import build_random_model  # noqa: E402
from eesim.kernels import paged_prefill_attention, paged_prefill_attention_ref  # noqa: E402
from eesim.model_spec import ModelSpec  # noqa: E402
from eesim.policies import kv_policy  # noqa: E402
from eesim.request import Request, Sequence  # noqa: E402
from eesim.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SPEC = ModelSpec("check", num_layers=6, hidden_size=256, num_heads=4, num_kv_heads=2, mlp_size=512,
                 vocab_size=503, exit_layers=(2, 4), dtype="float32", max_context=1024, norm_eps=1e-6)
failures: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failures.append(name)


def check_prefill_kernel() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    H, Hkv, hd, bs, nb = 32, 8, 128, 16, 600
    kc = torch.randn(nb, bs, Hkv, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    lens = [(0, 512), (1536, 512), (37, 300), (0, 1), (100, 0)]  # (prefix, chunk rows)
    tables, pos, cu = [], [], [0]
    perm = torch.randperm(nb, device="cuda", generator=g).to(torch.int32)
    used = 0
    for prefix, rows in lens:
        need = -(-(prefix + max(rows, 1)) // bs)
        tables.append(perm[used:used + need])
        used += need
        pos.append(torch.arange(prefix, prefix + rows))
        cu.append(cu[-1] + rows)
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    positions = torch.cat(pos).to(torch.int32).cuda()
    q = torch.randn(cu[-1], H, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    out = paged_prefill_attention(q, kc, vc, bt, cu_t, positions, 512, backend="triton")
    ref = paged_prefill_attention_ref(q, kc, vc, bt, cu_t, positions, 512)
    err = float((out.float() - ref.float()).abs().max())
    report("paged_prefill_attention bf16 (GQA 32/8, hd 128)", err < 2e-2, f"max |diff| {err:.2e}")


def serve(model, policy: str, device: str, graphs: bool, graphed_owing: bool = False):
    ex = GPUExecutor(model, SPEC, RandomExits(0.35, seed=3), policy, device=device, dtype=torch.float32, num_blocks=256,
                     block_size=16, backend="torch" if device == "cpu" else None, share_weights=False,
                     cuda_graphs=graphs)
    ex.graphed_owing = graphed_owing
    sch = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=160, block_size=16), SPEC,
                    kv_policy(policy), 256)
    rng = np.random.default_rng(7)
    seqs = []
    for i, pl in enumerate([300, 17, 95, 160, 5, 64, 230]):
        toks = tuple(int(t) for t in rng.integers(SPEC.vocab_size, size=pl))
        seqs.append(Sequence(Request(i, 0.0, pl, 12, prompt_tokens=toks)))
        sch.add(seqs[-1])
    run_plans(sch, ex)
    return [s.output_tokens for s in seqs], [s.exit_layers for s in seqs], ex.k_cache.float().cpu()


def check_executor(policies: list[str]) -> None:
    # larger-than-init weights, so that a wrong value is not hidden by tiny ones
    model = build_random_model(SPEC, "cpu", torch.float32, seed=0, std=0.2)
    torch.backends.cuda.matmul.allow_tf32 = False
    for policy in policies:
        ref = serve(model, policy, "cpu", False)
        for graphs, owing in ((False, False), (True, False), (True, True)):
            if owing and policy == "fill":
                continue  # nothing owed across steps
            got = serve(model, policy, "cuda", graphs, owing)
            same = got[0] == ref[0] and got[1] == ref[1]
            diff = float((got[2] - ref[2]).abs().max())
            report(f"executor {policy} graphs={graphs}" + (" graphed_owing" if owing else ""), same and diff < 5e-3,
                   f"tokens {'equal' if same else 'DIFFER'}, cache max |diff| {diff:.2e}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: needs a CUDA device")
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", default="fill,copy_hidden,recompute")
    args = ap.parse_args()
    check_prefill_kernel()
    check_executor(args.policies.split(","))
    print("all ok" if not failures else f"{len(failures)} FAILED: {failures}")
    sys.exit(1 if failures else 0)
