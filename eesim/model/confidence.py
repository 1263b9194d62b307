"""Exit confidence measures, with the names the simulator's exit traces use.

All take an exit's logits (..., V) and reduce the last dimension, vectorised over any leading batch
dimensions; they compute in fp32 so bf16 models give stable numbers. For every measure but ``entropy``,
higher means more confident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MEASURES = ("max_prob", "margin", "entropy", "cosine", "classifier", "oracle")


def max_prob(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 softmax probability."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of the softmax, in nats (lower = more confident)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def cosine(hidden: Tensor, prev_hidden: Tensor) -> Tensor:
    """Cosine similarity of this exit's residual with the previous exit's (the embedding for the first)."""
    return F.cosine_similarity(hidden.float(), prev_hidden.float(), dim=-1)


def oracle(logits: Tensor, final_logits: Tensor) -> Tensor:
    """Whether this exit's argmax equals the last layer's."""
    return logits.argmax(-1) == final_logits.argmax(-1)


def logit_stats(logits: Tensor) -> Tensor:
    """(max_prob, margin, entropy) stacked on a last dimension: the exit classifier's scalar features."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top = p.topk(2, dim=-1).values
    ent = -(p * logp).sum(-1)
    return torch.stack([top[..., 0], top[..., 0] - top[..., 1], ent], dim=-1)


def classifier(model, exit_index: int, hidden: Tensor, logits: Tensor) -> Tensor:
    """Sigmoid of exit ``exit_index``'s classifier head (1.0 at the last exit)."""
    return torch.sigmoid(model.classifier_logit(exit_index, hidden, logits).float())


def all_measures(model, logits: list[Tensor] | Tensor, hidden: list[Tensor] | Tensor, embed: Tensor,
                 final_logits: Tensor | None = None) -> dict[str, Tensor]:
    """Every measure at every exit given: logits[i] (..., V), hidden[i] (..., d) for exits 0..n-1 in order,
    ``embed`` the embedding output. Returns name -> (n, ...) tensors, plus ``argmax``. ``final_logits``
    defaults to the last exit's logits (pass it when ``logits`` stops short of the last layer)."""
    final = logits[-1] if final_logits is None else final_logits
    out: dict[str, list[Tensor]] = {name: [] for name in (*MEASURES, "argmax")}
    prev = embed
    for i, (lg, h) in enumerate(zip(logits, hidden)):
        stats = logit_stats(lg)
        out["max_prob"].append(stats[..., 0])
        out["margin"].append(stats[..., 1])
        out["entropy"].append(stats[..., 2])
        out["cosine"].append(cosine(h, prev))
        out["classifier"].append(classifier(model, i, h, lg))
        out["oracle"].append(oracle(lg, final))
        out["argmax"].append(lg.argmax(-1))
        prev = h
    return {k: torch.stack(v) for k, v in out.items()}
