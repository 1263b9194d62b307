"""The shape of an early-exit decoder: what the scheduler, the cost model and the model code share.

Layers are counted from 1: an exit at layer ``e`` reads the hidden state after the first ``e`` layers.
The last layer is always an exit (the model's own head). Byte counts are for the weights and the
KV cache in ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from eesim.errors import EesimError, require

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    mlp_size: int
    vocab_size: int
    exit_layers: tuple[int, ...]
    dtype: str = "bfloat16"
    head_dim: int = 0  # 0: hidden_size // num_heads
    tied_embeddings: bool = False
    max_context: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # derived, filled in __post_init__
    segment_bounds: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        for attr in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "mlp_size", "vocab_size",
                     "max_context"):
            value = getattr(self, attr)
            require(isinstance(value, int) and value > 0, f"{where}: {attr} must be a positive integer, got {value!r}")
        require(self.dtype in DTYPE_BYTES, f"{where}: dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        require(self.num_heads % self.num_kv_heads == 0,
                f"{where}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim == 0:
            require(self.hidden_size % self.num_heads == 0,
                    f"{where}: hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads})")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        require(self.head_dim > 0 and self.head_dim % 2 == 0, f"{where}: head_dim must be a positive even number")
        exits = tuple(int(e) for e in self.exit_layers)
        require(all(0 < e < self.num_layers for e in exits),
                f"{where}: exit layers must lie in 1..{self.num_layers - 1}, got {list(exits)}")
        require(list(exits) == sorted(set(exits)), f"{where}: exit layers must be strictly increasing, got {list(exits)}")
        object.__setattr__(self, "exit_layers", exits)
        object.__setattr__(self, "segment_bounds", (0, *exits, self.num_layers))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_exits(self) -> int:
        """Exits including the last layer."""
        return len(self.exit_layers) + 1

    @property
    def all_exits(self) -> tuple[int, ...]:
        return (*self.exit_layers, self.num_layers)

    @property
    def num_segments(self) -> int:
        """Runs of layers between consecutive exits; segment s covers layers (bounds[s], bounds[s+1]]."""
        return len(self.segment_bounds) - 1

    @property
    def segment_layers(self) -> tuple[int, ...]:
        b = self.segment_bounds
        return tuple(b[i + 1] - b[i] for i in range(len(b) - 1))

    @property
    def attn_params_per_layer(self) -> int:
        d = self.hidden_size
        return d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d

    @property
    def kv_proj_params_per_layer(self) -> int:
        return 2 * self.hidden_size * self.kv_dim

    @property
    def mlp_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.mlp_size

    @property
    def params_per_layer(self) -> int:
        return self.attn_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head (vocab x hidden) plus the final norm."""
        return self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        # one extra norm per intermediate exit (the shared head sits behind a per-exit norm)
        return embed + head + self.num_layers * self.params_per_layer + self.hidden_size * self.num_exits

    @property
    def weight_bytes_per_layer(self) -> int:
        return self.params_per_layer * self.dtype_bytes

    @property
    def kv_proj_weight_bytes_per_layer(self) -> int:
        return (self.kv_proj_params_per_layer + self.hidden_size) * self.dtype_bytes

    @property
    def head_weight_bytes(self) -> int:
        return self.head_params * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.kv_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def with_exits(self, exit_layers: tuple[int, ...] | list[int]) -> "ModelSpec":
        return replace(self, exit_layers=tuple(exit_layers))


def _every(step: int, num_layers: int) -> tuple[int, ...]:
    return tuple(range(step, num_layers, step))


MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                           mlp_size=11008, vocab_size=32000, exit_layers=_every(4, 32), max_context=4096),
    "llama3-8b": ModelSpec("llama3-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                           mlp_size=14336, vocab_size=128256, exit_layers=_every(4, 32), max_context=8192,
                           rope_theta=500000.0),
    # The project's own model size (issue 3): small enough to train on one GPU in minutes.
    "small": ModelSpec("small", num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=4, mlp_size=704,
                       vocab_size=4096, exit_layers=(2, 4, 6), max_context=2048, tied_embeddings=True),
}


def model_preset(name: str) -> ModelSpec:
    if name not in MODEL_PRESETS:
        raise EesimError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]
