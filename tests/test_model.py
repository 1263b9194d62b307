"""The early-exit Llama: against a hand-written reference, HF transformers (if present), its own decode path,
the KV policies, confidence measures and checkpoints."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from eesim.errors import EesimError  # noqa: E402
from eesim.model import confidence as C  # noqa: E402
from eesim.model.checkpoint import load_checkpoint, load_hf_llama, save_checkpoint  # noqa: E402
from eesim.model.transformer import EarlyExitLlama, greedy_generate  # noqa: E402
from eesim.model_spec import ModelSpec  # noqa: E402

SPEC = ModelSpec("tiny", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, mlp_size=96, vocab_size=101,
                 exit_layers=(1, 2), dtype="float32", max_context=128, rope_theta=500.0, norm_eps=1e-6)
TIED = ModelSpec("tiny-tied", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4, mlp_size=96,
                 vocab_size=101, exit_layers=(2,), dtype="float32", max_context=128, tied_embeddings=True)


def make(spec=SPEC, head="shared", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = EarlyExitLlama(spec, head)
    # Larger-than-init random weights (and random norm weights) so that errors are not hidden by tiny values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return model.to(dtype).eval()


def reference_logits(state: dict, spec: ModelSpec, tokens, final_norm="norm.weight"):
    """A straightforward float64 Llama forward over HF-named weights; logits at every exit."""
    sd = {k: v.double() for k, v in state.items()}
    hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    b, t = tokens.shape

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + spec.norm_eps)

    pos = torch.arange(t, dtype=torch.float64)
    inv = torch.tensor([1.0 / spec.rope_theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    ang = pos[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # (b, h, t, hd), first/second-half pairing as in HF
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = sd["embed_tokens.weight"][tokens]
    head = sd.get("lm_head.weight", sd["embed_tokens.weight"])
    out = []
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for li in range(spec.num_layers):
        p = f"layers.{li}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(b, t, nh, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(b, t, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        att = torch.zeros(b, nh, t, hd, dtype=torch.float64)
        for head_i in range(nh):
            kv_i = head_i // (nh // nkv)
            s = q[:, head_i] @ k[:, kv_i].transpose(-1, -2) / math.sqrt(hd)
            s = s.masked_fill(~causal, float("-inf"))
            att[:, head_i] = torch.softmax(s, -1) @ v[:, kv_i]
        x = x + att.transpose(1, 2).reshape(b, t, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ sd[p + "mlp.down_proj.weight"].T
        if li + 1 in spec.exit_layers:
            i = spec.exit_layers.index(li + 1)
            w = sd.get(f"exit_heads.{i}.weight", head)
            out.append(rms(x, sd[f"exit_norms.{i}.weight"]) @ w.T)
    out.append(rms(x, sd[final_norm]) @ head.T)
    return torch.stack(out)


def tokens_for(spec, b=2, t=12, seed=1):
    return torch.randint(0, spec.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec,head", [(SPEC, "shared"), (SPEC, "per_exit"), (TIED, "shared")])
def test_forward_matches_reference(spec, head):
    model = make(spec, head)
    tok = tokens_for(spec)
    out = model(tok)
    assert out.logits.shape == (spec.num_exits, 2, 12, spec.vocab_size)
    assert out.hidden.shape == (spec.num_exits, 2, 12, spec.hidden_size)
    ref = reference_logits(model.state_dict(), spec, tok)
    torch.testing.assert_close(out.logits, ref, rtol=1e-9, atol=1e-9)


def test_parameter_names_follow_hf():
    names = set(make().state_dict())
    for n in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.3.input_layernorm.weight",
              "layers.0.post_attention_layernorm.weight", "layers.1.self_attn.q_proj.weight",
              "layers.1.self_attn.k_proj.weight", "layers.1.self_attn.v_proj.weight",
              "layers.1.self_attn.o_proj.weight", "layers.2.mlp.gate_proj.weight", "layers.2.mlp.up_proj.weight",
              "layers.2.mlp.down_proj.weight", "exit_norms.0.weight", "exit_norms.1.weight"):
        assert n in names
    tied = make(TIED)
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_matches_transformers_if_installed():
    transformers = pytest.importorskip("transformers")
    model = make(SPEC)
    cfg = transformers.LlamaConfig(
        vocab_size=SPEC.vocab_size, hidden_size=SPEC.hidden_size, intermediate_size=SPEC.mlp_size,
        num_hidden_layers=SPEC.num_layers, num_attention_heads=SPEC.num_heads,
        num_key_value_heads=SPEC.num_kv_heads, rms_norm_eps=SPEC.norm_eps, rope_theta=SPEC.rope_theta,
        max_position_embeddings=SPEC.max_context, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False)
    hf = transformers.LlamaForCausalLM(cfg).double().eval()
    state = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()
             if k.startswith(("embed_tokens", "layers", "norm", "lm_head"))}
    hf.load_state_dict(state, strict=True)
    tok = tokens_for(SPEC)
    with torch.no_grad():
        ref = hf(tok).logits
    # HF computes rope angles in fp32 even for a float64 model, hence the looser tolerance
    torch.testing.assert_close(model(tok).logits[-1], ref, rtol=1e-5, atol=1e-5)


def test_incremental_full_depth_matches_dense():
    model = make()
    tok = tokens_for(SPEC, t=10)
    dense = model(tok)
    cache = model.new_cache(2, 16)
    out = model.prefill(tok[:, :4], cache)
    for i in range(SPEC.num_exits):
        torch.testing.assert_close(out.logits[i], dense.logits[i, :, 3], rtol=1e-9, atol=1e-9)
    for t in range(4, 10):
        out = model.decode_step(tok[:, t], cache)
        assert out.exit_layer == SPEC.num_layers and len(out.logits) == SPEC.num_exits
        for i in range(SPEC.num_exits):
            torch.testing.assert_close(out.logits[i], dense.logits[i, :, t], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(out.hidden[i], dense.hidden[i, :, t], rtol=1e-9, atol=1e-9)


# Exit plan per decode step (layer to stop at; 4 = full depth): mixed depths, then a full-depth step.
PLAN = [1, 2, 1, 4, 2, 1, 1, 4]


def run_plan(model, policy, tok, prompt_len=3):
    cache = model.new_cache(tok.shape[0], 16, policy)
    model.prefill(tok[:, :prompt_len], cache)
    outs = []
    for step, stop in enumerate(PLAN):
        rule = (lambda i, lg, h, prev, stop=stop: SPEC.all_exits[i] == stop)
        outs.append(model.decode_step(tok[:, prompt_len + step], cache, rule))
        assert outs[-1].exit_layer == (stop if policy != "full" else SPEC.num_layers)
    return cache, outs


def test_fill_equals_copy_hidden():
    model = make()
    tok = tokens_for(SPEC, t=12)
    fill, outs_f = run_plan(model, "fill", tok)
    copy, outs_c = run_plan(model, "copy_hidden", tok)
    for li in range(SPEC.num_layers):
        n = fill.pos - 1  # the last step went full depth, so every earlier position is settled in both
        torch.testing.assert_close(fill.k[li][:, :, :n], copy.k[li][:, :, :n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fill.v[li][:, :, :n], copy.v[li][:, :, :n], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs_f, outs_c):
        torch.testing.assert_close(a.logits[-1], b.logits[-1], rtol=1e-12, atol=1e-12)


def test_recompute_yields_full_depth_kv():
    model = make()
    tok = tokens_for(SPEC, t=12)
    full, outs_full = run_plan(model, "full", tok)
    rec, outs_rec = run_plan(model, "recompute", tok)
    fill, _ = run_plan(model, "fill", tok)
    n = full.pos
    for li in range(SPEC.num_layers):
        torch.testing.assert_close(rec.k[li][:, :, :n], full.k[li][:, :, :n], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rec.v[li][:, :, :n], full.v[li][:, :, :n], rtol=1e-9, atol=1e-9)
    # full-depth steps see exactly the full model's output; fill's approximate KV does not
    for step, stop in enumerate(PLAN):
        if stop == SPEC.num_layers:
            torch.testing.assert_close(outs_rec[step].logits[-1], outs_full[step].logits[-1], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(fill.k[3][:, :, 3], full.k[3][:, :, 3])


def test_greedy_generate_and_full_policy_never_exits():
    model = make()
    prompt = tokens_for(SPEC, t=5)
    toks, layers = greedy_generate(model, prompt, 6, "full", should_exit=lambda *a: True)
    assert toks.shape == (2, 6) and layers == [SPEC.num_layers] * 6
    dense = model(torch.cat([prompt, toks[:, :-1]], 1)).logits[-1, :, 4:].argmax(-1)
    assert torch.equal(dense, toks)
    toks2, layers2 = greedy_generate(model, prompt, 6, "fill", should_exit=lambda i, *a: i == 0)
    assert layers2 == [SPEC.num_layers] + [1] * 5


# ---- confidence --------------------------------------------------------------------------------

def test_confidence_measures_by_hand():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, 13, generator=g) * 3
    final = torch.randn(5, 7, 13, generator=g) * 3
    h, hp = torch.randn(5, 7, 16, generator=g), torch.randn(5, 7, 16, generator=g)
    for b in range(5):
        for t in range(7):
            z = logits[b, t].double()
            p = [math.exp(v) for v in z.tolist()]
            s = sum(p)
            p = sorted((v / s for v in p), reverse=True)
            assert C.max_prob(logits)[b, t].item() == pytest.approx(p[0], rel=1e-5)
            assert C.margin(logits)[b, t].item() == pytest.approx(p[0] - p[1], rel=1e-4, abs=1e-6)
            assert C.entropy(logits)[b, t].item() == pytest.approx(-sum(v * math.log(v) for v in p), rel=1e-5)
            a, c = h[b, t].tolist(), hp[b, t].tolist()
            cos = sum(x * y for x, y in zip(a, c)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in c))
            assert C.cosine(h, hp)[b, t].item() == pytest.approx(cos, rel=1e-5, abs=1e-6)
            agrees = max(range(13), key=lambda j: logits[b, t, j]) == max(range(13), key=lambda j: final[b, t, j])
            assert bool(C.oracle(logits, final)[b, t]) == agrees
    stats = C.logit_stats(logits)
    torch.testing.assert_close(stats[..., 0], C.max_prob(logits))
    torch.testing.assert_close(stats[..., 2], C.entropy(logits))


def test_all_measures_and_classifier():
    model = make(dtype=torch.float32)
    out = model(tokens_for(SPEC))
    m = C.all_measures(model, list(out.logits), list(out.hidden), out.embed)
    assert set(m) == {*C.MEASURES, "argmax"}
    for v in m.values():
        assert v.shape == (SPEC.num_exits, 2, 12)
    assert bool(m["oracle"][-1].all()) and torch.all(m["classifier"][-1] == 1.0)
    i = 0
    normed = model.exit_norms[i](out.hidden[i])
    expect = torch.sigmoid(model.exit_classifiers[i](normed, C.logit_stats(out.logits[i])))
    torch.testing.assert_close(m["classifier"][i], expect)
    assert torch.all((m["classifier"][0] > 0) & (m["classifier"][0] < 1))
    torch.testing.assert_close(m["cosine"][0], C.cosine(out.hidden[0], out.embed))


# ---- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,head", [(SPEC, "per_exit"), (TIED, "shared")])
def test_save_load_round_trip(tmp_path, spec, head):
    model = make(spec, head, dtype=torch.float32)
    save_checkpoint(model, tmp_path, tokenizer={"file": "tokenizer.json"})
    back = load_checkpoint(tmp_path)
    assert back.spec == spec and back.head_kind == head
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if spec.tied_embeddings:
        assert back.lm_head.weight is back.embed_tokens.weight
    tok = tokens_for(spec)
    assert torch.equal(model(tok).logits, back(tok).logits)


def write_hf(tmp_path, model, spec, sharded=False):
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": spec.num_layers,
           "hidden_size": spec.hidden_size, "num_attention_heads": spec.num_heads,
           "num_key_value_heads": spec.num_kv_heads, "intermediate_size": spec.mlp_size,
           "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta, "rms_norm_eps": spec.norm_eps,
           "tie_word_embeddings": spec.tied_embeddings, "torch_dtype": "float32",
           "max_position_embeddings": spec.max_context}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {("" if k.startswith("lm_head") else "model.") + k: v.float().contiguous()
             for k, v in model.state_dict().items() if k.startswith(("embed_tokens", "layers", "norm", "lm_head"))
             and not (spec.tied_embeddings and k.startswith("lm_head"))}
    if not sharded:
        save_file(state, str(tmp_path / "model.safetensors"))
        return
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for f, ks in halves.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))


@pytest.mark.parametrize("spec,sharded", [(SPEC, False), (TIED, True)])
def test_load_hf_llama(tmp_path, spec, sharded):
    model = make(spec, dtype=torch.float32)
    write_hf(tmp_path, model, spec, sharded)
    hf = load_hf_llama(tmp_path, dtype=torch.float64)
    assert hf.spec.exit_layers == (1, 2, 3) and hf.spec.num_kv_heads == spec.num_kv_heads
    assert hf.spec.tied_embeddings == spec.tied_embeddings
    tok = tokens_for(spec)
    state = {k: v for k, v in model.state_dict().items()}
    ref_spec = spec.with_exits((1, 2, 3))
    for i in range(3):
        state[f"exit_norms.{i}.weight"] = state["norm.weight"]
    state = {k: v for k, v in state.items() if not k.startswith("exit_heads")}
    ref = reference_logits(state, ref_spec, tok)
    torch.testing.assert_close(hf(tok).logits, ref, rtol=1e-6, atol=1e-6)
    hf2 = load_hf_llama(tmp_path, exit_layers=(2,))
    assert hf2.spec.exit_layers == (2,) and hf2.embed_tokens.weight.dtype == torch.float32


def test_malformed_checkpoints(tmp_path):
    with pytest.raises(EesimError, match="no such directory"):
        load_hf_llama(tmp_path / "nope")
    with pytest.raises(EesimError, match="no config.json"):
        load_hf_llama(tmp_path)
    model = make(SPEC, dtype=torch.float32)
    write_hf(tmp_path, model, SPEC)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(EesimError, match="no model.safetensors"):
        load_hf_llama(tmp_path)
    write_hf(tmp_path, model, SPEC)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(EesimError, match="shape"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(EesimError, match="unknown weight keys"):
        load_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(EesimError, match="missing weight keys"):
        load_hf_llama(tmp_path)
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EesimError, match="hidden_size"):
        load_hf_llama(tmp_path)
    own = tmp_path / "own"
    save_checkpoint(model, own)
    (own / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(EesimError, match="unreadable"):
        load_checkpoint(own)
    (own / "eesim_model.json").write_text("{")
    with pytest.raises(EesimError, match="malformed"):
        load_checkpoint(own)
    with pytest.raises(EesimError, match="not an eesim checkpoint"):
        load_checkpoint(tmp_path / "missing")
