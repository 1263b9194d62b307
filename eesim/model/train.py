"""Train the project's own small early-exit model on Python source.

    python -m eesim.model.train --out ckpt/small --preset small --steps 20000 --batch 32 --seq-len 1024 \
        --max-corpus-mb 64 --time-budget-s 420

Backbone loss: a weighted mean of every exit's next-token cross-entropy with weights proportional to the
exit layer (EE-LLM / LayerSkip style): deep exits, which must carry the model, dominate, while shallow exits
still learn to predict. Then, with the backbone frozen, the exit classifiers learn "this exit's argmax equals
the last layer's". The run stops cleanly at --time-budget-s (counted from process start, reserving time for
the classifier phase, the final evaluation and saving) so it fits a 10-minute GPU command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eesim.errors import EesimError, require
from eesim.model.checkpoint import TOKENIZER_FILE, save_checkpoint
from eesim.model.confidence import logit_stats
from eesim.model.corpus import read_text, split_corpus
from eesim.model.tokenizer import encode_stream, train_tokenizer
from eesim.model.transformer import EarlyExitLlama
from eesim.model_spec import model_preset

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def exit_weights(spec) -> torch.Tensor:
    w = torch.tensor(spec.all_exits, dtype=torch.float32)
    return w / w.sum()


class Batches:
    """Random windows of seq_len+1 tokens from one token stream kept on the device."""

    def __init__(self, stream: np.ndarray, seq_len: int, device: torch.device, seed: int) -> None:
        require(len(stream) > seq_len + 1, f"token stream of {len(stream)} tokens is shorter than --seq-len {seq_len}")
        self.data = torch.from_numpy(stream.astype(np.int64)).to(device)
        self.seq_len = seq_len
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (batch,), generator=self.gen)
        idx = starts.to(self.data.device)[:, None] + torch.arange(self.seq_len + 1, device=self.data.device)
        win = self.data[idx]
        return win[:, :-1], win[:, 1:]


def exit_losses(model: EarlyExitLlama, fwd, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    hidden, _ = fwd(x)
    return [F.cross_entropy(model.exit_logits(i, h).flatten(0, 1).float(), y.flatten())
            for i, h in enumerate(hidden)]


@torch.no_grad()
def evaluate(model: EarlyExitLlama, val: list[tuple[torch.Tensor, torch.Tensor]], amp) -> dict:
    """Held-out loss, perplexity, agreement with the last exit, and classifier accuracy per exit."""
    model.eval()
    n_exit = model.num_exits
    loss_sum, agree, clf_ok, count = [0.0] * n_exit, [0] * n_exit, [0] * n_exit, 0
    for x, y in val:
        with amp():
            hidden, _ = model.forward_hidden(x)
            logits = [model.exit_logits(i, h).float() for i, h in enumerate(hidden)]
        final = logits[-1].argmax(-1)
        for i, lg in enumerate(logits):
            loss_sum[i] += F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="sum").item()
            same = lg.argmax(-1) == final
            agree[i] += int(same.sum())
            with amp():
                pred = model.classifier_logit(i, hidden[i], lg) > 0
            clf_ok[i] += int((pred == same).sum())
        count += y.numel()
    model.train()
    out = {}
    for i, e in enumerate(model.spec.all_exits):
        loss = loss_sum[i] / count
        out[str(e)] = {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50.0)), 3),
                       "agree_with_last": round(agree[i] / count, 5), "classifier_accuracy": round(clf_ok[i] / count, 5)}
    return out


def train(args: argparse.Namespace) -> dict:
    deadline = T0 + args.time_budget_s
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    spec = model_preset(args.preset)
    out_dir = Path(args.out)

    # ---- corpus and tokenizer ----
    split = split_corpus(max_train_mb=args.max_corpus_mb, roots=[tuple(r.split("=", 1)) for r in args.corpus_root]
                         if args.corpus_root else None)
    require(split.train and split.val, f"corpus split has {len(split.train)} training and {len(split.val)} held-out files")
    train_texts = [read_text(f) for f in split.train]
    val_texts = []
    val_budget = args.val_mb * 1e6
    for f in split.val:  # held-out files in key order, capped: evaluation only needs a few MB
        if val_budget <= 0:
            break
        val_texts.append(read_text(f))
        val_budget -= f.size
    log(f"corpus: {len(train_texts)} train files ({split.describe()['train_bytes'] / 1e6:.1f} MB), "
        f"{len(val_texts)} held-out files read")
    sample, budget = [], args.tokenizer_sample_mb * 1e6
    for t in train_texts:
        if budget <= 0:
            break
        sample.append(t)
        budget -= len(t)
    tok = train_tokenizer(sample, spec.vocab_size)
    require(tok.get_vocab_size() <= spec.vocab_size, "tokenizer vocabulary exceeds the model's")
    train_stream = encode_stream(tok, train_texts)
    val_stream = encode_stream(tok, val_texts)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    log(f"tokenizer: vocab {tok.get_vocab_size()}, {len(train_stream)} train tokens "
        f"({train_bytes / max(1, len(train_stream)):.2f} bytes/token), {len(val_stream)} held-out tokens")

    # ---- model ----
    model = EarlyExitLlama(spec, args.head).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {spec.name} {n_params / 1e6:.2f}M params on {device}")
    fwd = torch.compile(model.forward_hidden) if args.compile else model.forward_hidden
    if device.type == "cuda":
        def amp():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        def amp():
            return torch.autocast("cpu", enabled=False)
    batches = Batches(train_stream, args.seq_len, device, args.seed)
    val_gen = Batches(val_stream, min(args.seq_len, len(val_stream) - 2), device, args.seed + 1)
    val = [val_gen.sample(args.batch) for _ in range(args.eval_batches)]

    backbone = [p for n, p in model.named_parameters() if not n.startswith("exit_classifiers")]
    decay = [p for p in backbone if p.dim() >= 2]
    no_decay = [p for p in backbone if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    weights = exit_weights(spec).to(device)
    warmup = max(1, min(args.warmup, args.steps // 10))
    # Reserve time for the classifier phase, evaluation and saving; the LR schedule follows whichever of
    # steps or time runs out first so the cosine decay always completes.
    reserve = min(90.0, 0.2 * args.time_budget_s)
    backbone_end = deadline - reserve
    t_start = time.monotonic()
    history, step, tokens_seen = [], 0, 0
    model.train()
    while step < args.steps:
        now = time.monotonic()
        if now >= backbone_end:
            log(f"time budget reached after {step} steps")
            break
        progress = max(step / args.steps, (now - t_start) / max(1e-9, backbone_end - t_start))
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batches.sample(args.batch)
        with amp():
            losses = exit_losses(model, fwd, x, y)
        loss = sum(w * l for w, l in zip(weights, losses))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone, 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        if step % args.log_every == 0 or step == 1:
            log(f"step {step} lr {lr:.2e} loss {loss.item():.4f} per exit "
                + " ".join(f"{l.item():.3f}" for l in losses))
        if args.eval_every and step % args.eval_every == 0:
            ev = evaluate(model, val, amp)
            history.append({"step": step, "loss": {e: v["loss"] for e, v in ev.items()}})
            log(f"held-out loss per exit: {history[-1]['loss']}")
    backbone_s = time.monotonic() - t_start

    # ---- exit classifiers, backbone frozen ----
    for p in backbone:
        p.requires_grad_(False)
    clf_params = list(model.exit_classifiers.parameters())
    clf_opt = torch.optim.Adam(clf_params, lr=args.clf_lr)
    clf_end = deadline - min(30.0, 0.1 * args.time_budget_s)
    clf_steps = 0
    while clf_steps < args.clf_steps and time.monotonic() < clf_end:
        x, _ = batches.sample(args.batch)
        with torch.no_grad(), amp():
            hidden, _ = model.forward_hidden(x)
            logits = [model.exit_logits(i, h).float() for i, h in enumerate(hidden)]
        final = logits[-1].argmax(-1)
        loss = 0.0
        for i in range(len(spec.exit_layers)):
            target = (logits[i].argmax(-1) == final).float()
            with amp():
                pred = model.exit_classifiers[i](model.exit_normed(i, hidden[i]).detach(), logit_stats(logits[i]))
            loss = loss + F.binary_cross_entropy_with_logits(pred.float(), target)
        clf_opt.zero_grad(set_to_none=True)
        loss.backward()
        clf_opt.step()
        clf_steps += 1
        if clf_steps % args.log_every == 0:
            log(f"classifier step {clf_steps} loss {loss.item():.4f}")

    final_eval = evaluate(model, val, amp)
    log(f"final held-out: {json.dumps(final_eval)}")

    # ---- write ----
    save_checkpoint(model, out_dir, dtype=args.save_dtype,
                    tokenizer={"file": TOKENIZER_FILE, "kind": "byte-level BPE", "vocab_size": tok.get_vocab_size()})
    tok.save(str(out_dir / TOKENIZER_FILE))
    corpus = split.describe()
    corpus.update(description="Python source: the interpreter's standard library and installed packages' .py "
                  "files; 2% of files held out by key hash", python=sys.version.split()[0],
                  train_tokens=int(len(train_stream)), val_files_used=len(val_texts),
                  val_tokens_used=int(len(val_stream)))
    card = {
        "model": spec.name, "head": args.head, "params": n_params,
        "shape": {k: getattr(spec, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                 "head_dim", "mlp_size", "vocab_size", "max_context")}
        | {"exit_layers": list(spec.all_exits), "tied_embeddings": spec.tied_embeddings},
        "corpus": corpus,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": tok.get_vocab_size(), "file": TOKENIZER_FILE,
                      "bytes_per_token": round(train_bytes / max(1, len(train_stream)), 3)},
        "training": {"steps": step, "classifier_steps": clf_steps, "batch": args.batch, "seq_len": args.seq_len,
                     "tokens_seen": tokens_seen, "lr": args.lr, "warmup": warmup, "weight_decay": args.weight_decay,
                     "exit_loss_weights": [round(float(w), 4) for w in exit_weights(spec)],
                     "compile": bool(args.compile), "seed": args.seed, "backbone_seconds": round(backbone_s, 1),
                     "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                     "save_dtype": args.save_dtype},
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "wall_time_s": round(time.monotonic() - T0, 1),
        "heldout": final_eval,
        "heldout_history": history,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {out_dir}")
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eesim.model.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--preset", default="small")
    p.add_argument("--head", default="shared", choices=("shared", "per_exit"))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-corpus-mb", type=float, default=64.0)
    p.add_argument("--val-mb", type=float, default=2.0, help="held-out text read for evaluation")
    p.add_argument("--tokenizer-sample-mb", type=float, default=16.0)
    p.add_argument("--corpus-root", action="append", default=[], metavar="LABEL=DIR",
                   help="corpus root(s) instead of the interpreter's stdlib and site-packages")
    p.add_argument("--time-budget-s", type=float, default=420.0)
    p.add_argument("--clf-steps", type=int, default=300)
    p.add_argument("--clf-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone forward")
    p.add_argument("--save-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global T0
    T0 = time.monotonic()  # the budget counts from here when called in-process (tests)
    try:
        train(parse_args(argv))
    except EesimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
