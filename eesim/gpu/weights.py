"""Weights for the GPU executor: a random-weight model at any shape, and the executor's fused layout.

``build_random_model`` makes an ``EarlyExitLlama`` straight on the target device in the target dtype
(via the meta device: no fp32 copy on the host, which matters at 7B). ``FusedWeights`` holds what the
executor's layer loop and the fill kernel read: Q, K and V stacked into one ``(L, q_dim + 2 kv_dim,
hidden)`` buffer (one GEMM per layer: at batch 1 three 32 MB GEMVs run split-K at ~1.9 TB/s plus a
reduce each, one 96 MB GEMV at ~2.6 TB/s), with ``wq`` / ``wk`` / ``wv`` strided views of it (``wk``,
``wv`` are ``(L, kv_dim, hidden)``, the layout ``fused_fill`` takes), O/down per layer, gate and up
concatenated per layer ``(2 * mlp, hidden)`` (one GEMM), and the input / post-attention norm weights.
With ``share=True`` the model's own parameters are rebound to views of these buffers, so the model
and the executor share one copy of the weights (values unchanged; the parameters stop requiring grad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eesim.model.transformer import EarlyExitLlama
from eesim.model_spec import ModelSpec


@torch.no_grad()
def build_random_model(spec: ModelSpec, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0, head: str = "shared", std: float = 0.02) -> EarlyExitLlama:
    """An ``EarlyExitLlama`` with random weights (GPT-2 style init, as ``reset_parameters``), built on
    ``device`` in ``dtype`` without materialising it on the host first."""
    device = torch.device(device)
    with torch.device("meta"):
        model = EarlyExitLlama(spec, head)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            module._parameters[name] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype),
                                                    requires_grad=False)
    model.tie_weights()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.split(".")[0] in ("norm", "exit_norms"):
            p.fill_(1.0)
        elif name.startswith("exit_classifiers"):
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                p.zero_()
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(0.0, std / math.sqrt(2 * spec.num_layers), generator=gen)
        else:
            p.normal_(0.0, std, generator=gen)
    return model.eval()


@dataclass
class FusedWeights:
    wqkv: Tensor  # (L, q_dim + 2 * kv_dim, hidden): Q rows, then K, then V
    wq: Tensor  # (L, q_dim, hidden) view of wqkv
    wk: Tensor  # (L, kv_dim, hidden) view of wqkv
    wv: Tensor  # (L, kv_dim, hidden) view of wqkv
    wo: list[Tensor]  # per layer (hidden, q_dim)
    w_gate_up: list[Tensor]  # per layer (2 * mlp, hidden)
    w_down: list[Tensor]  # per layer (hidden, mlp)
    ln1: Tensor  # (L, hidden) input norms
    ln2: Tensor  # (L, hidden) post-attention norms

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: EarlyExitLlama, share: bool = True) -> "FusedWeights":
        layers = list(model.layers)
        p0 = model.embed_tokens.weight
        attn0 = layers[0].self_attn
        qd, kvd = attn0.q_proj.weight.shape[0], attn0.k_proj.weight.shape[0]
        wqkv = torch.stack([torch.cat([layer.self_attn.q_proj.weight.detach(), layer.self_attn.k_proj.weight.detach(),
                                       layer.self_attn.v_proj.weight.detach()]) for layer in layers])
        wq, wk, wv = wqkv[:, :qd], wqkv[:, qd:qd + kvd], wqkv[:, qd + kvd:]
        ln1 = torch.stack([layer.input_layernorm.weight.detach() for layer in layers])
        ln2 = torch.stack([layer.post_attention_layernorm.weight.detach() for layer in layers])
        gate_up, wo, wd = [], [], []
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            gu = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
            gate_up.append(gu)
            wo.append(layer.self_attn.o_proj.weight.detach())
            wd.append(mlp.down_proj.weight.detach())
            if share:
                m = mlp.gate_proj.weight.shape[0]
                mlp.gate_proj.weight = nn.Parameter(gu[:m], requires_grad=False)
                mlp.up_proj.weight = nn.Parameter(gu[m:], requires_grad=False)
                layer.self_attn.q_proj.weight = nn.Parameter(wq[i], requires_grad=False)
                layer.self_attn.k_proj.weight = nn.Parameter(wk[i], requires_grad=False)
                layer.self_attn.v_proj.weight = nn.Parameter(wv[i], requires_grad=False)
                layer.input_layernorm.weight = nn.Parameter(ln1[i], requires_grad=False)
                layer.post_attention_layernorm.weight = nn.Parameter(ln2[i], requires_grad=False)
        assert wk.device == p0.device
        return cls(wqkv, wq, wk, wv, wo, gate_up, wd, ln1, ln2)
