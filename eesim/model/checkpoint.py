"""Checkpoints: eesim's own (model.safetensors + eesim_model.json) and local Hugging Face Llama directories."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eesim.atomic import atomic_path, write_atomic
from eesim.errors import EesimError, require
from eesim.model.transformer import EarlyExitLlama, ExitClassifier
from eesim.model_spec import DTYPE_BYTES, ModelSpec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "eesim_model.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _spec_fields(spec: ModelSpec) -> dict:
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "segment_bounds"}
    fields["exit_layers"] = list(spec.exit_layers)
    return fields


def save_checkpoint(model: EarlyExitLlama, out_dir: str | Path, dtype: str = "float32",
                    tokenizer: dict | None = None, extra: dict | None = None) -> Path:
    """Write weights (in ``dtype``) and config to ``out_dir``; returns the directory.

    The tied LM head is stored once (as embed_tokens): safetensors refuses aliased tensors.
    """
    require(dtype in TORCH_DTYPES, f"checkpoint dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()
             if not (model.spec.tied_embeddings and k == "lm_head.weight")}
    config = {"format_version": FORMAT_VERSION, "spec": _spec_fields(model.spec), "head": model.head_kind,
              "storage_dtype": dtype, "tokenizer": tokenizer or {}, **(extra or {})}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_atomic(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return out


def read_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / CONFIG_FILE
    require(path.is_file(), f"{ckpt_dir}: no {CONFIG_FILE} (not an eesim checkpoint)")
    try:
        config = json.loads(path.read_text())
        spec = ModelSpec(**{**config["spec"], "exit_layers": tuple(config["spec"]["exit_layers"])})
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EesimError(f"{path}: malformed config ({exc.__class__.__name__}: {exc})") from None
    config["spec"] = spec
    return config


def _read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        require(path.is_file(), f"missing weights file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except EesimError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise EesimError(f"{path}: unreadable safetensors file ({exc})") from None
    return state


def build_model(spec: ModelSpec, head: str, state: dict[str, torch.Tensor], where: str,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> EarlyExitLlama:
    """Construct on the meta device and adopt ``state`` (no second copy of the weights); every parameter
    must be present with its exact shape, and no unknown key may remain."""
    with torch.device("meta"):
        model = EarlyExitLlama(spec, head)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (spec.tied_embeddings and k == "lm_head.weight")}
    unknown = sorted(set(state) - set(expected))
    require(not unknown, f"{where}: unknown weight keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(expected) - set(state))
    require(not missing, f"{where}: missing weight keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, shape in expected.items():
        require(tuple(state[k].shape) == tuple(shape),
                f"{where}: {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {k: v.to(device, dtype) for k, v in state.items()}
    if spec.tied_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()  # assign=True replaced the embedding Parameter; re-alias the head
    return model.eval()


def load_checkpoint(ckpt_dir: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> EarlyExitLlama:
    config = read_config(ckpt_dir)
    state = _read_safetensors([Path(ckpt_dir) / WEIGHTS_FILE])
    return build_model(config["spec"], config.get("head", "shared"), state, str(ckpt_dir), dtype, device)


# ---- Hugging Face ---------------------------------------------------------------------------------

def default_exits(num_layers: int) -> tuple[int, ...]:
    """Every quarter of the depth."""
    return tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)} - {num_layers}))


def hf_config_to_spec(config: dict, exit_layers: tuple[int, ...] | None = None, name: str = "hf-llama") -> ModelSpec:
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        scaling = config.get("rope_scaling")
        require(not scaling or scaling.get("rope_type", scaling.get("type")) == "default",
                f"{name}: rope_scaling {scaling} is not supported")
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
        return ModelSpec(
            name=name, num_layers=layers, hidden_size=int(config["hidden_size"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            mlp_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            exit_layers=tuple(exit_layers) if exit_layers is not None else default_exits(layers),
            dtype=dtype if dtype in DTYPE_BYTES else "float32", head_dim=int(config.get("head_dim") or 0),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_context=int(config.get("max_position_embeddings", 4096)),
            rope_theta=float(config.get("rope_theta", 10000.0)), norm_eps=float(config.get("rms_norm_eps", 1e-6)))
    except KeyError as exc:
        raise EesimError(f"{name}: config.json lacks {exc.args[0]!r}") from None


def load_hf_llama(hf_dir: str | Path, exit_layers: tuple[int, ...] | None = None,
                  dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> EarlyExitLlama:
    """Load a local HF Llama directory (config.json + model.safetensors or sharded with an index).

    There are no trained exit heads: each exit uses the shared LM head behind a copy of the final norm,
    and the exit classifiers keep their random init (their scores are meaningless until trained).
    """
    root = Path(hf_dir)
    require(root.is_dir(), f"{hf_dir}: no such directory")
    cfg_path = root / "config.json"
    require(cfg_path.is_file(), f"{hf_dir}: no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise EesimError(f"{cfg_path}: malformed JSON ({exc})") from None
    spec = hf_config_to_spec(config, exit_layers, name=config.get("_name_or_path") or root.name)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise EesimError(f"{index}: malformed index ({exc})") from None
        paths = [root / f for f in files]
    else:
        require((root / WEIGHTS_FILE).is_file(), f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        paths = [root / WEIGHTS_FILE]
    raw = _read_safetensors(paths)
    state = {}
    for key, tensor in raw.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints store rope's derived frequencies
        state[key.removeprefix("model.")] = tensor
    if spec.tied_embeddings:
        state.pop("lm_head.weight", None)
    dtype = dtype or TORCH_DTYPES.get(spec.dtype, torch.float32)
    # The missing early-exit parts: exit norms copy the final norm, classifiers take a fresh init.
    if "norm.weight" in state:
        for i in range(len(spec.exit_layers)):
            state[f"exit_norms.{i}.weight"] = state["norm.weight"].clone()
    for i in range(len(spec.exit_layers)):
        for k, v in ExitClassifier(spec.hidden_size).state_dict().items():
            state[f"exit_classifiers.{i}.{k}"] = v
    return build_model(spec, "shared", state, str(hf_dir), dtype, device)
