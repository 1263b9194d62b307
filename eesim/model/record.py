"""Record exit traces from a trained checkpoint, and measure the real quality cost of each KV policy.

    python -m eesim.model.record --checkpoint ckpt/small --out traces/exit_trace.parquet --num-prompts 512 \
        --policies-out traces/kv_policies.csv

Prompts are random slices of held-out corpus files (never trained on); continuations are greedy at full
depth. Every generated token gets one row per exit (last layer included) with every confidence measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from eesim.errors import EesimError, require
from eesim.exit_trace import SCHEMA, ExitTrace
from eesim.model.checkpoint import TOKENIZER_FILE, load_checkpoint, read_config
from eesim.model.confidence import all_measures, max_prob
from eesim.model.corpus import read_text, split_corpus
from eesim.model.tokenizer import encode_texts, load_tokenizer
from eesim.model.transformer import EarlyExitLlama, StepOutput, greedy_generate

SCHEMA_VERSION = 1
TRACE_SCHEMA = SCHEMA  # the exit-trace schema (eesim/exit_trace.py), column for column


def heldout_tokens(ckpt_dir: str | Path, max_files: int = 400, roots: list[tuple[str, Path]] | None = None
                   ) -> list[np.ndarray]:
    """Token ids of held-out corpus files (the same hash split training used), in key order."""
    tok = load_tokenizer(Path(ckpt_dir) / TOKENIZER_FILE)
    files = split_corpus(roots=roots, max_train_mb=0).val[:max_files]
    require(files, "no held-out corpus files")
    return [ids for ids in encode_texts(tok, [read_text(f) for f in files]) if len(ids) > 0]


def make_batches(docs: list[np.ndarray], num_prompts: int, batch: int, seed: int, prompt_range=(16, 512),
                 cont_range=(8, 256), max_context: int = 2048) -> list[tuple[torch.Tensor, int]]:
    """Batches of equal-length prompts (lock-step decoding needs no padding); lengths vary between batches,
    drawn log-uniformly so short and long prompts are both well represented."""
    rng = np.random.default_rng(seed)
    batches, made = [], 0
    longest = max(len(d) for d in docs)
    while made < num_prompts:
        b = min(batch, num_prompts - made)
        p = int(np.exp(rng.uniform(np.log(prompt_range[0]), np.log(prompt_range[1] + 1))))
        p = max(prompt_range[0], min(p, prompt_range[1], longest))
        n = int(np.exp(rng.uniform(np.log(cont_range[0]), np.log(cont_range[1] + 1))))
        n = max(1, min(n, cont_range[1], max_context - p))
        long_enough = [d for d in docs if len(d) >= p]
        rows = []
        for _ in range(b):
            d = long_enough[rng.integers(len(long_enough))]
            start = int(rng.integers(len(d) - p + 1))
            rows.append(torch.from_numpy(d[start:start + p].astype(np.int64)))
        batches.append((torch.stack(rows), n))
        made += b
    return batches


@torch.no_grad()
def record_traces(model: EarlyExitLlama, batches: list[tuple[torch.Tensor, int]], device: torch.device,
                  progress: bool = False) -> pd.DataFrame:
    """Greedy full-depth generation; one row per (sequence, generated token, exit)."""
    exits = np.asarray(model.spec.all_exits, dtype=np.int16)
    cols: dict[str, list[np.ndarray]] = {f.name: [] for f in TRACE_SCHEMA}
    seq0 = 0
    for bi, (prompt, n) in enumerate(batches):
        b, p = prompt.shape
        per_step: list[dict[str, np.ndarray]] = []

        def on_step(i: int, out: StepOutput) -> None:
            m = all_measures(model, out.logits, out.hidden, out.embed)
            per_step.append({k: v.cpu().numpy() for k, v in m.items()})  # each (E, B)

        greedy_generate(model, prompt.to(device), n, "full", on_step=on_step)
        e = len(exits)
        # row order: sequence, token, exit
        stack = {k: np.stack([s[k] for s in per_step], axis=0).transpose(2, 0, 1).reshape(-1) for k in per_step[0]}
        cols["seq_id"].append(np.repeat(np.arange(seq0, seq0 + b, dtype=np.int32), n * e))
        cols["prompt_len"].append(np.full(b * n * e, p, dtype=np.int32))
        cols["token_index"].append(np.tile(np.repeat(np.arange(n, dtype=np.int32), e), b))
        cols["exit_layer"].append(np.tile(exits, b * n))
        # Clamp float round-off into the schema's domains (eesim/exit_trace.py): fp32 softmax can give a
        # max_prob a hair above 1 and an entropy a hair below 0, and cosine_similarity can exceed 1.
        max_p = np.clip(stack["max_prob"].astype(np.float32), 0.0, 1.0)
        cols["max_prob"].append(max_p)
        cols["margin"].append(np.minimum(np.clip(stack["margin"].astype(np.float32), 0.0, 1.0), max_p))
        cols["entropy"].append(np.maximum(stack["entropy"].astype(np.float32), np.float32(0.0)))
        cols["cosine"].append(np.clip(stack["cosine"].astype(np.float32), -1.0, 1.0))
        cols["classifier"].append(np.clip(stack["classifier"].astype(np.float32), 0.0, 1.0))
        cols["argmax"].append(stack["argmax"].astype(np.int32))
        cols["agrees"].append(stack["oracle"].astype(bool))
        seq0 += b
        if progress:
            print(f"batch {bi + 1}/{len(batches)}: {b} x (prompt {p}, continuation {n})", flush=True)
    return pd.DataFrame({k: np.concatenate(v) for k, v in cols.items()})


def write_trace(df: pd.DataFrame, path: str | Path, meta: dict) -> Path:
    """Write through the trace reader's own validation and writer (exact schema, atomic)."""
    return ExitTrace.from_frame(df, meta, where=f"recorded trace for {path}").write(path)


@torch.no_grad()
def evaluate_kv_policies(model: EarlyExitLlama, prompts: list[tuple[torch.Tensor, int]], device: torch.device,
                         thresholds: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95),
                         policies: tuple[str, ...] = ("fill", "copy_hidden", "recompute")) -> pd.DataFrame:
    """Real per-sequence early exit on max_prob >= threshold, one sequence at a time, against full depth.

    ``teacher_forced_agreement``: inputs are the full-depth continuation, so each token's agreement isolates
    the policy's KV error; ``free_run_agreement``: the model feeds itself, so errors compound;
    ``free_run_prefix``: share of tokens before the first divergence.
    """
    refs = []
    for prompt, n in prompts:
        for row in prompt:
            p = row[None].to(device)
            refs.append((p, greedy_generate(model, p, n, "full")[0]))
    rows = [{"policy": "full", "threshold": float("nan")}]
    rows[0].update(_policy_stats(model, refs, "full", None))
    for policy in policies:
        for thr in thresholds:
            def rule(i, logits, h, prev, thr=thr):
                return bool((max_prob(logits) >= thr).all())
            rows.append({"policy": policy, "threshold": thr, **_policy_stats(model, refs, policy, rule)})
    df = pd.DataFrame(rows)
    df.insert(2, "sequences", len(refs))
    return df


def _policy_stats(model, refs, policy, rule) -> dict:
    spec = model.spec
    forced_ok = free_ok = tokens = 0
    prefix_shares, layers = [], []
    for prompt, ref in refs:
        n = ref.shape[1]
        forced, lay = greedy_generate(model, prompt, n, policy, rule, force=ref)
        free, _ = greedy_generate(model, prompt, n, policy, rule)
        forced_ok += int((forced == ref).sum())
        same = (free == ref)[0]
        free_ok += int(same.sum())
        prefix_shares.append(int(same.cumprod(0).sum()) / n)
        layers += lay
        tokens += n
    lay = np.asarray(layers)
    out = {"tokens": tokens, "teacher_forced_agreement": forced_ok / tokens, "free_run_agreement": free_ok / tokens,
           "free_run_prefix": float(np.mean(prefix_shares)), "mean_exit_layer": float(lay.mean()),
           "layers_saved": 1.0 - float(lay.mean()) / spec.num_layers}
    for e in spec.all_exits:
        out[f"exit_{e}_share"] = float((lay == e).mean())
    return out


def to_markdown(df: pd.DataFrame) -> str:
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def _record(args, model, config, docs, device, t0) -> None:
    spec = model.spec
    batches = make_batches(docs, args.num_prompts, args.batch, args.seed, (args.prompt_min, args.prompt_max),
                           (args.cont_min, args.cont_max), spec.max_context)
    df = record_traces(model, batches, device, progress=True)
    card_path = Path(args.checkpoint) / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    meta = {"num_layers": spec.num_layers, "exit_layers": list(spec.all_exits), "source": "recorded",
            "model": spec.name, "schema_version": SCHEMA_VERSION,
            "params": {"checkpoint": str(args.checkpoint), "head": config.get("head"),
                       "card": {k: card.get(k) for k in ("params", "heldout", "hardware") if k in card}
                       | {"tokens_seen": card.get("training", {}).get("tokens_seen")},
                       "num_prompts": args.num_prompts, "batch": args.batch,
                       "prompt_range": [args.prompt_min, args.prompt_max],
                       "continuation_range": [args.cont_min, args.cont_max], "seed": args.seed,
                       "dtype": args.dtype, "device": str(device)}}
    write_trace(df, args.out, meta)
    print(f"wrote {args.out}: {len(df)} rows, {df.seq_id.nunique()} sequences "
          f"({time.monotonic() - t0:.1f}s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eesim.model.record", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default="traces/exit_trace.parquet")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--cont-min", type=int, default=8)
    ap.add_argument("--cont-max", type=int, default=256)
    ap.add_argument("--max-files", type=int, default=400, help="held-out files to draw prompts from")
    ap.add_argument("--corpus-root", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--policies-out", default=None, help="also evaluate KV policies; CSV path (.md written alongside)")
    ap.add_argument("--no-trace", action="store_true", help="skip the exit trace (with --policies-out: policies only)")
    ap.add_argument("--policy-prompts", type=int, default=8)
    ap.add_argument("--policy-cont", type=int, default=32, help="continuation length for the policy evaluation")
    ap.add_argument("--thresholds", default="0.5,0.8,0.9,0.95")
    args = ap.parse_args(argv)
    if args.no_trace and not args.policies_out:
        ap.error("--no-trace needs --policies-out (nothing to do otherwise)")
    try:
        t0 = time.monotonic()
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        model = load_checkpoint(args.checkpoint, dtype=dtype, device=device)
        config = read_config(args.checkpoint)
        roots = [tuple(r.split("=", 1)) for r in args.corpus_root] or None
        docs = heldout_tokens(args.checkpoint, args.max_files, roots)
        spec = model.spec
        if not args.no_trace:
            _record(args, model, config, docs, device, t0)
        if args.policies_out:
            thresholds = tuple(float(x) for x in args.thresholds.split(","))
            pol_batches = make_batches(docs, args.policy_prompts, 1, args.seed + 1,
                                       (args.prompt_min, args.prompt_max), (args.policy_cont, args.policy_cont),
                                       spec.max_context)
            res = evaluate_kv_policies(model, pol_batches, device, thresholds)
            out = Path(args.policies_out)
            out.parent.mkdir(parents=True, exist_ok=True)
            res.to_csv(out, index=False)
            out.with_suffix(".md").write_text(to_markdown(res))
            print(to_markdown(res), flush=True)
    except EesimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
