"""A Llama-style decoder with early exits, in plain PyTorch (gpt-fast / nano-vllm style).

Parameter names follow Hugging Face ``LlamaModel`` (minus its ``model.`` prefix) so that loading an HF
checkpoint is a prefix strip, not a rename table. Exits are the layers of ``spec.exit_layers`` plus the
last layer; exit index ``i`` indexes ``spec.all_exits``.

Two paths: ``forward`` (dense, causal, all positions: training and analysis) and ``prefill`` +
``decode_step`` (incremental greedy decode with a dense per-layer KV cache that may stop at an exit; see
``KVCache`` for how the skipped layers' KV is then produced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eesim.errors import EesimError, require
from eesim.model_spec import ModelSpec

HEAD_KINDS = ("shared", "per_exit")
KV_POLICIES = ("full", "fill", "copy_hidden", "recompute")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least fp32 (as HF does) so bf16 weights give the same result as HF's.
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (T, head_dim) in HF's non-interleaved (rotate_half) layout."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        d = spec.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(d, spec.q_dim, bias=False)
        self.k_proj = nn.Linear(d, spec.kv_dim, bias=False)
        self.v_proj = nn.Linear(d, spec.kv_dim, bias=False)
        self.o_proj = nn.Linear(spec.q_dim, d, bias=False)

    def kv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Roped keys and values (B, Hkv, T, hd) of normed input ``h`` (B, T, d)."""
        b, t, _ = h.shape
        k = self.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def attend(self, h: Tensor, cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Queries from ``h`` (B, R, d) against k/v (B, Hkv, S, hd); causal when ``mask`` is None (R == S)."""
        b, r, _ = h.shape
        q = apply_rope(self.q_proj(h).view(b, r, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # HF's repeat_kv: query head j reads kv head j // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, r, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.mlp_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.mlp_size, bias=False)
        self.down_proj = nn.Linear(spec.mlp_size, spec.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.mlp = MLP(spec)

    def kv_of_residual(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The KV this layer would write for residual ``x``: what "fill" / "copy_hidden" use for skipped layers."""
        return self.self_attn.kv(self.input_layernorm(x), cos, sin)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Dense causal pass over all positions."""
        h = self.input_layernorm(x)
        k, v = self.self_attn.kv(h, cos, sin)
        x = x + self.self_attn.attend(h, cos, sin, k, v, None)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x: Tensor, start: int, k_cache: Tensor, v_cache: Tensor, cos: Tensor,
                       sin: Tensor) -> Tensor:
        """Rows ``x`` (B, R, d) at positions start..start+R-1: write their KV, attend to keys 0..start+R-1."""
        r = x.shape[1]
        end = start + r
        h = self.input_layernorm(x)
        k, v = self.self_attn.kv(h, cos, sin)
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        mask = None
        if start > 0 or r == 1:
            rows = torch.arange(start, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device)[None, :] <= rows
        x = x + self.self_attn.attend(h, cos, sin, k_cache[:, :, :end], v_cache[:, :, :end], mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class ExitClassifier(nn.Module):
    """Predicts "this exit's argmax equals the last layer's" from the exit-normed hidden state and the
    exit's own max_prob, margin and entropy (the logit statistics carry most of the signal; the hidden
    features let it learn token-type effects)."""

    NUM_STATS = 3

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(dim + self.NUM_STATS, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, normed: Tensor, stats: Tensor) -> Tensor:
        x = torch.cat([normed.float(), stats.float()], dim=-1).to(self.proj.weight.dtype)
        return self.out(F.silu(self.proj(x))).squeeze(-1)


@dataclass
class ExitOutputs:
    """Dense forward result. logits (E, B, T, V); hidden (E, B, T, d) is the raw residual stream after each
    exit's layers; embed (B, T, d) is the embedding output (the "previous exit" of the first exit)."""

    logits: Tensor
    hidden: Tensor
    embed: Tensor


@dataclass
class StepOutput:
    """One decode step (or the last row of a prefill). ``exit_index`` is the exit taken; ``logits`` and
    ``hidden`` lists hold every exit reached (B, V) / (B, d), the taken one last."""

    exit_index: int
    exit_layer: int
    logits: list[Tensor]
    hidden: list[Tensor]
    embed: Tensor

    @property
    def token(self) -> Tensor:
        return self.logits[-1].argmax(-1)


# should_exit(exit_index, logits (B, V), hidden (B, d), prev_hidden (B, d)) -> stop here?
ExitRule = Callable[[int, Tensor, Tensor, Tensor], bool]


@dataclass
class KVCache:
    """Dense per-layer KV cache for lock-step decoding of B sequences (shared positions).

    When a step exits at layer e, the KV of the skipped layers for that position is produced by ``policy``:
    - "fill": right away, from the exit's residual through each skipped layer's own input norm, k/v proj and rope;
    - "copy_hidden": the same values, computed when a later pass first reaches that layer (deferred fill);
    - "recompute": the owed positions run through the skipped layers as extra rows of the next pass that
      goes deeper, which yields exactly the KV full depth would have produced;
    - "full": exits are never taken.
    Owed positions of a layer are always the suffix filled[l]..pos-1, because every pass that reaches a
    layer settles all of that layer's debts. ``pending`` holds their residual: the exit residual for
    "copy_hidden", the residual carried so far for "recompute".
    """

    k: list[Tensor]
    v: list[Tensor]
    filled: list[int]
    pending: Tensor
    policy: str
    pos: int = 0
    exit_layers: list[int] = field(default_factory=list)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


class EarlyExitLlama(nn.Module):
    def __init__(self, spec: ModelSpec, head: str = "shared") -> None:
        super().__init__()
        require(head in HEAD_KINDS, f"exit head must be one of {HEAD_KINDS}, got {head!r}")
        self.spec, self.head_kind = spec, head
        d = spec.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, d)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(d, spec.norm_eps)
        self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
        self.exit_norms = nn.ModuleList(RMSNorm(d, spec.norm_eps) for _ in spec.exit_layers)
        self.exit_heads = nn.ModuleList(
            nn.Linear(d, spec.vocab_size, bias=False) for _ in (spec.exit_layers if head == "per_exit" else ()))
        self.exit_classifiers = nn.ModuleList(ExitClassifier(d) for _ in spec.exit_layers)
        self.reset_parameters()
        self.tie_weights()

    # ---- parameters ------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        if self.spec.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        # GPT-2 style init: residual-writing projections scaled by depth so the stream stays O(1).
        std = 0.02
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("layernorm.weight") or "norm" in name.split(".")[0]:
                nn.init.ones_(p)
            elif name.startswith("exit_classifiers"):
                continue  # nn.Linear's own init
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.spec.num_layers))
            else:
                nn.init.normal_(p, std=std)

    @property
    def num_exits(self) -> int:
        return self.spec.num_exits

    def _rope(self, start: int, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        pos = torch.arange(start, start + length, device=like.device)
        return rope_cos_sin(pos, self.spec.head_dim, self.spec.rope_theta, like.dtype)

    # ---- exits -----------------------------------------------------------------------------------
    def exit_normed(self, i: int, h: Tensor) -> Tensor:
        return self.norm(h) if i == self.num_exits - 1 else self.exit_norms[i](h)

    def exit_logits(self, i: int, h: Tensor) -> Tensor:
        """Logits of exit ``i`` (index into spec.all_exits) from the raw residual ``h`` after its layers."""
        normed = self.exit_normed(i, h)
        if i < self.num_exits - 1 and self.head_kind == "per_exit":
            return self.exit_heads[i](normed)
        return self.lm_head(normed)

    def classifier_logit(self, i: int, h: Tensor, logits: Tensor) -> Tensor:
        """Raw logit of exit ``i``'s classifier; the last exit always agrees with itself (+inf)."""
        if i == self.num_exits - 1:
            return torch.full(logits.shape[:-1], float("inf"), device=logits.device)
        from eesim.model.confidence import logit_stats  # local: confidence imports this module's types

        return self.exit_classifiers[i](self.exit_normed(i, h), logit_stats(logits))

    # ---- dense path ------------------------------------------------------------------------------
    def forward_hidden(self, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
        """Residual stream after each exit's layers (list of (B, T, d)) and the embedding output."""
        x = self.embed_tokens(tokens)
        embed = x
        cos, sin = self._rope(0, tokens.shape[1], x)
        exits = set(self.spec.all_exits)
        hidden = []
        for n, layer in enumerate(self.layers, start=1):
            x = layer(x, cos, sin)
            if n in exits:
                hidden.append(x)
        return hidden, embed

    def forward(self, tokens: Tensor) -> ExitOutputs:
        hidden, embed = self.forward_hidden(tokens)
        logits = torch.stack([self.exit_logits(i, h) for i, h in enumerate(hidden)])
        return ExitOutputs(logits=logits, hidden=torch.stack(hidden), embed=embed)

    # ---- incremental decode ----------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None, policy: str = "full") -> KVCache:
        require(policy in KV_POLICIES, f"KV policy must be one of {KV_POLICIES}, got {policy!r}")
        s = self.spec
        max_len = max_len or s.max_context
        p = self.embed_tokens.weight
        shape = (batch, s.num_kv_heads, max_len, s.head_dim)
        return KVCache(
            k=[torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(s.num_layers)],
            v=[torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(s.num_layers)],
            filled=[0] * s.num_layers,
            pending=torch.zeros(batch, max_len, s.hidden_size, dtype=p.dtype, device=p.device),
            policy=policy)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, cache: KVCache) -> StepOutput:
        """Run the prompt (B, T) at full depth into an empty cache; exits reported for the last row."""
        require(cache.pos == 0, "prefill needs an empty cache")
        t = tokens.shape[1]
        require(t <= cache.max_len, f"prompt of {t} tokens exceeds the cache length {cache.max_len}")
        x = self.embed_tokens(tokens)
        embed = x[:, -1]
        cos, sin = self._rope(0, t, x)
        exits = {e: i for i, e in enumerate(self.spec.all_exits)}
        logits, hidden = [], []
        for n, layer in enumerate(self.layers, start=1):
            x = layer.forward_cached(x, 0, cache.k[n - 1], cache.v[n - 1], cos, sin)
            cache.filled[n - 1] = t
            if n in exits:
                hidden.append(x[:, -1])
                logits.append(self.exit_logits(exits[n], x[:, -1]))
        cache.pos = t
        cache.exit_layers.extend([self.spec.num_layers] * t)
        return StepOutput(self.num_exits - 1, self.spec.num_layers, logits, hidden, embed)

    @torch.no_grad()
    def decode_step(self, token: Tensor, cache: KVCache, should_exit: ExitRule | None = None) -> StepOutput:
        """Feed one token per sequence (B,) at position cache.pos; stop at the first exit ``should_exit``
        accepts (never under policy "full"; the last layer always stops)."""
        pos = cache.pos
        require(pos < cache.max_len, f"KV cache full ({cache.max_len} positions)")
        x = self.embed_tokens(token.view(-1, 1))
        embed = prev = x[:, 0]
        exits = {e: i for i, e in enumerate(self.spec.all_exits)}
        logits, hidden = [], []
        taken = self.num_exits - 1
        for n, layer in enumerate(self.layers, start=1):
            li = n - 1
            start = cache.filled[li]
            if start < pos:  # this layer owes KV for positions start..pos-1
                if cache.policy == "copy_hidden":
                    cos, sin = self._rope(start, pos - start, x)
                    k, v = layer.kv_of_residual(cache.pending[:, start:pos], cos, sin)
                    cache.k[li][:, :, start:pos], cache.v[li][:, :, start:pos] = k, v
                    cache.filled[li] = pos
                elif cache.policy == "recompute":
                    rows = torch.cat([cache.pending[:, start:pos], x], dim=1)
                    cos, sin = self._rope(start, pos + 1 - start, x)
                    out = layer.forward_cached(rows, start, cache.k[li], cache.v[li], cos, sin)
                    cache.pending[:, start:pos] = out[:, :-1]
                    x = out[:, -1:]
                    cache.filled[li] = pos + 1
                else:
                    raise EesimError(f"KV cache under policy {cache.policy!r} owes layer {n} positions "
                                     f"{start}..{pos - 1}")
            if cache.filled[li] <= pos:
                cos, sin = self._rope(pos, 1, x)
                x = layer.forward_cached(x, pos, cache.k[li], cache.v[li], cos, sin)
                cache.filled[li] = pos + 1
            if n in exits:
                i = exits[n]
                h = x[:, 0]
                hidden.append(h)
                logits.append(self.exit_logits(i, h))
                if (i < self.num_exits - 1 and cache.policy != "full" and should_exit is not None
                        and should_exit(i, logits[-1], h, prev)):
                    taken = i
                    self._settle_skipped(n, x, cache)
                    break
                prev = h
        cache.pos = pos + 1
        cache.exit_layers.append(self.spec.all_exits[taken])
        return StepOutput(taken, self.spec.all_exits[taken], logits, hidden, embed)

    def _settle_skipped(self, exit_layer: int, x: Tensor, cache: KVCache) -> None:
        pos = cache.pos
        if cache.policy == "fill":
            cos, sin = self._rope(pos, 1, x)
            for li in range(exit_layer, self.spec.num_layers):
                k, v = self.layers[li].kv_of_residual(x, cos, sin)
                cache.k[li][:, :, pos:pos + 1], cache.v[li][:, :, pos:pos + 1] = k, v
                cache.filled[li] = pos + 1
        else:  # copy_hidden and recompute both start from the exit residual
            cache.pending[:, pos] = x[:, 0]


@torch.no_grad()
def greedy_generate(model: EarlyExitLlama, prompt: Tensor, max_new: int, policy: str = "full",
                    should_exit: ExitRule | None = None, force: Tensor | None = None,
                    on_step: Callable[[int, StepOutput], None] | None = None) -> tuple[Tensor, list[int]]:
    """Greedy continuation of ``prompt`` (B, T): returns new tokens (B, max_new) and the exit layer per step.

    With ``force`` (B, >= max_new-1), the inputs after the first step are these tokens instead of the model's
    own choices (teacher forcing: isolates per-token quality from divergence). ``on_step(i, out)`` sees
    each step, token index ``i`` from 0.
    """
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + max_new, policy)
    out = model.prefill(prompt, cache)
    tokens, layers = [out.token], [out.exit_layer]
    if on_step:
        on_step(0, out)
    for i in range(1, max_new):
        inp = force[:, i - 1] if force is not None else tokens[-1]
        out = model.decode_step(inp, cache, should_exit)
        tokens.append(out.token)
        layers.append(out.exit_layer)
        if on_step:
            on_step(i, out)
    return torch.stack(tokens, dim=1), layers
