"""Exit traces: per generated token and per exit, the confidence measures and whether the exit agrees.

The simulator replays a trace instead of running a model. A trace is a parquet file in long form, one
row per (sequence, token, exit); rows may come in any order. The recorder writes exactly these types;
the reader also accepts other integer/float widths and casts them.

============  =======  ==================================================================================
column        type     meaning
============  =======  ==================================================================================
seq_id        int32    one recorded generation (a prompt and its greedy continuation); unique per sequence
prompt_len    int32    that generation's prompt length, >= 1, the same on all its rows
token_index   int32    0-based index of the generated token; 0..n-1 without gaps within a sequence
exit_layer    int16    layers run at this exit; every token has one row per exit, the last layer included
max_prob      float32  softmax max probability at this exit, in [0, 1]
margin        float32  top-1 minus top-2 probability, in [0, max_prob]
entropy       float32  entropy of the exit's softmax in nats, finite and >= 0 (LOWER = more confident)
cosine        float32  cosine similarity of this exit's hidden state with the previous exit's (the embedding
                       output for the first exit), in [-1, 1]; recorders must clamp float round-off
classifier    float32  a learned exit classifier's probability that this exit agrees, in [0, 1]
argmax        int32    the exit's predicted token id, >= 0, or -1 when unknown (synthetic traces)
agrees        bool     argmax equals the last layer's argmax; always True at the last exit
============  =======  ==================================================================================

No column may hold nulls or NaNs; other columns are ignored. File-level key-value metadata under the
key ``eesim`` is a JSON object with ``num_layers``, ``exit_layers`` (all exits, strictly increasing, the
last equal to ``num_layers``; exactly the exits the rows use), ``source`` ("synthetic" or "recorded"),
``model`` (a name), ``params`` (an object: generator parameters or checkpoint information) and
``schema_version`` (1). ``ModelSpec.exit_layers`` leaves the last layer out; ``ModelSpec.all_exits``
is what matches ``exit_layers`` here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eesim.atomic import atomic_path
from eesim.errors import EesimError, require

SCHEMA_VERSION = 1
METADATA_KEY = b"eesim"
MEASURE_COLUMNS = ("max_prob", "margin", "entropy", "cosine", "classifier")
SCHEMA = pa.schema([("seq_id", pa.int32()), ("prompt_len", pa.int32()), ("token_index", pa.int32()),
                    ("exit_layer", pa.int16()), *[(m, pa.float32()) for m in MEASURE_COLUMNS],
                    ("argmax", pa.int32()), ("agrees", pa.bool_())])
COLUMNS = tuple(SCHEMA.names)
METADATA_KEYS = ("num_layers", "exit_layers", "source", "model", "params", "schema_version")
SOURCES = ("synthetic", "recorded")
_I32 = np.iinfo(np.int32)
# Allowed closed ranges; float columns must also be finite. exit_layer is checked against the exits.
_DOMAINS = {"seq_id": (_I32.min, _I32.max), "prompt_len": (1, _I32.max), "token_index": (0, _I32.max),
            "max_prob": (0.0, 1.0), "margin": (0.0, 1.0), "entropy": (0.0, np.inf), "cosine": (-1.0, 1.0),
            "classifier": (0.0, 1.0), "argmax": (-1, _I32.max)}


def trace_metadata(num_layers: int, exit_layers, source: str, model: str, params: dict) -> dict:
    """The metadata object for a trace (recorders: pass checkpoint information as ``params``)."""
    return {"num_layers": num_layers, "exit_layers": [int(e) for e in exit_layers], "source": source,
            "model": model, "params": params, "schema_version": SCHEMA_VERSION}


def _check_metadata(meta, where: str) -> tuple[dict, int, tuple[int, ...]]:
    require(isinstance(meta, dict), f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in METADATA_KEYS if k not in meta]
    require(not missing, f"{where}: metadata lacks {', '.join(missing)}")
    require(meta["schema_version"] == SCHEMA_VERSION,
            f"{where}: schema_version {meta['schema_version']!r} is not supported (this reader reads {SCHEMA_VERSION})")
    n, exits = meta["num_layers"], meta["exit_layers"]
    require(type(n) is int and 1 <= n <= np.iinfo(np.int16).max,
            f"{where}: metadata num_layers must be a positive integer, got {n!r}")
    require(isinstance(exits, (list, tuple)) and len(exits) > 0 and all(type(e) is int for e in exits)
            and list(exits) == sorted(set(exits)) and exits[0] >= 1 and exits[-1] == n,
            f"{where}: metadata exit_layers must be strictly increasing integers in 1..{n} ending at "
            f"num_layers={n}, got {exits!r}")
    require(meta["source"] in SOURCES, f"{where}: metadata source must be one of {SOURCES}, got {meta['source']!r}")
    require(isinstance(meta["model"], str), f"{where}: metadata model must be a string")
    require(isinstance(meta["params"], dict), f"{where}: metadata params must be a JSON object")
    try:  # one normal form (lists, not tuples) so that a written and re-read trace compares equal
        normal = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise EesimError(f"{where}: metadata is not JSON-serialisable ({exc})") from None
    return normal, n, tuple(exits)


@dataclass(frozen=True, eq=False)
class ExitTrace:
    """A trace in dense wide form: token arrays have shape (num_tokens, num_exits), sequences in order.

    Sequence i owns token rows ``seq_offsets[i]:seq_offsets[i+1]`` (in token_index order).
    """

    metadata: dict
    values: dict  # measure name -> float32 (num_tokens, num_exits)
    agrees: np.ndarray  # bool (num_tokens, num_exits)
    argmax: np.ndarray  # int32 (num_tokens, num_exits)
    seq_offsets: np.ndarray  # int64 (num_sequences + 1,)
    prompt_lens: np.ndarray  # int32 (num_sequences,)
    seq_ids: np.ndarray  # int32 (num_sequences,)
    num_layers: int = field(init=False)
    exit_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        meta, n, exits = _check_metadata(self.metadata, "exit trace")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("metadata", meta), set_("num_layers", n), set_("exit_layers", exits)
        require(set(self.values) == set(MEASURE_COLUMNS), f"exit trace: values must hold {MEASURE_COLUMNS}")
        offsets = np.asarray(self.seq_offsets, dtype=np.int64)
        require(len(offsets) >= 2 and offsets[0] == 0 and np.all(np.diff(offsets) >= 1),
                "exit trace is empty or has a sequence without tokens")
        shape = (int(offsets[-1]), len(exits))
        arrays = {"agrees": (self.agrees, np.bool_), "argmax": (self.argmax, np.int32)}
        arrays |= {f"values[{m}]": (self.values[m], np.float32) for m in MEASURE_COLUMNS}
        frozen = {}
        for name, (array, dtype) in arrays.items():
            require(np.shape(array) == shape, f"exit trace: {name} has shape {np.shape(array)}, expected {shape}")
            frozen[name] = np.array(array, dtype=dtype)  # a private copy, then read-only: immutable-ish
        for name, array, dtype in (("prompt_lens", self.prompt_lens, np.int32), ("seq_ids", self.seq_ids, np.int32)):
            require(np.shape(array) == (len(offsets) - 1,), f"exit trace: {name} must hold one entry per sequence")
            frozen[name] = np.array(array, dtype=dtype)
        require(len(np.unique(frozen["seq_ids"])) == len(offsets) - 1, "exit trace: seq_ids must be unique")
        require(frozen["agrees"][:, -1].all(), "exit trace: agrees must be True at the last exit")
        frozen["seq_offsets"] = offsets.copy()
        for array in frozen.values():
            array.flags.writeable = False
        set_("values", MappingProxyType({m: frozen.pop(f"values[{m}]") for m in MEASURE_COLUMNS}))
        for name, array in frozen.items():
            set_(name, array)

    # ---- shape ------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.seq_offsets[-1])

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def output_lens(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    @property
    def exit_fractions(self) -> np.ndarray:
        return np.asarray(self.exit_layers, dtype=np.float64) / self.num_layers

    # ---- queries ----------------------------------------------------------------------------------
    def oracle_exit_index(self) -> np.ndarray:
        """Per token, the first exit whose argmax agrees (later exits may disagree again; the oracle stops)."""
        return np.argmax(self.agrees, axis=1)  # the last exit always agrees, so a True exists

    def rows_for(self, seq_index: int, n_tokens: int) -> np.ndarray:
        """Token rows for a request generating ``n_tokens`` tokens from sequence ``seq_index``.

        A request longer than the recorded sequence wraps around: token k uses the sequence's token
        ``k mod length``, so its difficulty profile repeats rather than being invented.
        """
        require(0 <= seq_index < self.num_sequences,
                f"exit trace: sequence index {seq_index} outside 0..{self.num_sequences - 1}")
        require(n_tokens >= 0, f"exit trace: n_tokens must be >= 0, got {n_tokens}")
        start, length = self.seq_offsets[seq_index], self.seq_offsets[seq_index + 1] - self.seq_offsets[seq_index]
        return start + np.arange(n_tokens, dtype=np.int64) % length

    def agreement_by_exit(self) -> pd.DataFrame:
        """Per exit: share of tokens agreeing with the last layer, and share the oracle exits at."""
        oracle = np.bincount(self.oracle_exit_index(), minlength=self.num_exits) / self.num_tokens
        return pd.DataFrame({"exit_layer": self.exit_layers, "exit_fraction": self.exit_fractions,
                             "agreement": self.agrees.mean(axis=0), "oracle_share": oracle})

    def summary(self) -> dict:
        oracle_depth = self.exit_fractions[self.oracle_exit_index()]
        return {"source": self.metadata["source"], "model": self.metadata["model"], "num_layers": self.num_layers,
                "exit_layers": list(self.exit_layers), "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens, "mean_prompt_len": float(self.prompt_lens.mean()),
                "mean_output_len": float(self.output_lens.mean()),
                "oracle_mean_depth_fraction": float(oracle_depth.mean()),
                "oracle_last_exit_share": float(np.mean(oracle_depth == 1.0))}

    def remap_to(self, num_layers: int) -> tuple[int, ...]:
        """The exits of a ``num_layers`` model at this trace's depth fractions: round(f * num_layers).

        Python's round (ties to even). Raises when the mapped exits collide or fall outside 1..num_layers.
        """
        require(isinstance(num_layers, (int, np.integer)) and num_layers >= 1,
                f"remap_to: num_layers must be a positive integer, got {num_layers!r}")
        num_layers = int(num_layers)
        mapped = tuple(round(e * num_layers / self.num_layers) for e in self.exit_layers)
        require(list(mapped) == sorted(set(mapped)) and mapped[0] >= 1 and mapped[-1] == num_layers,
                f"exit trace: exits {list(self.exit_layers)} of {self.num_layers} layers map to {list(mapped)} on "
                f"{num_layers} layers, which are not distinct layers in 1..{num_layers} ending at {num_layers}")
        return mapped

    # ---- long form and files ----------------------------------------------------------------------
    def _columns(self) -> dict[str, np.ndarray]:
        e, per_token = self.num_exits, np.repeat(np.arange(self.num_sequences), self.output_lens)
        starts = np.repeat(self.seq_offsets[:-1], self.output_lens)
        cols = {"seq_id": self.seq_ids[per_token], "prompt_len": self.prompt_lens[per_token],
                "token_index": (np.arange(self.num_tokens) - starts).astype(np.int32)}
        cols = {k: np.repeat(v, e) for k, v in cols.items()}
        cols["exit_layer"] = np.tile(np.asarray(self.exit_layers, dtype=np.int16), self.num_tokens)
        cols |= {m: self.values[m].ravel() for m in MEASURE_COLUMNS}
        return cols | {"argmax": self.argmax.ravel(), "agrees": self.agrees.ravel()}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self._columns())

    @classmethod
    def from_frame(cls, df: pd.DataFrame, metadata: dict, where: str = "exit trace frame") -> "ExitTrace":
        return _frame_to_trace(df, metadata, where)

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically (no half-written traces), zstd-compressed."""
        table = pa.table(self._columns(), schema=SCHEMA)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(self.metadata).encode()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return Path(path)


def _first(mask: np.ndarray) -> int:
    """Index of the first True (-1 if none: messages are built before require() looks at the condition)."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else -1


def _frame_to_trace(df: pd.DataFrame, metadata, where: str) -> ExitTrace:
    meta, _, exit_layers = _check_metadata(metadata, where)
    missing = [c for c in COLUMNS if c not in df.columns]
    require(not missing, f"{where}: missing column(s) {', '.join(missing)}")
    require(len(df) > 0, f"{where}: the trace is empty (no rows)")
    cols = {}
    for c in COLUMNS:  # nulls first: pandas turns an integer column with nulls into floats
        bad = df[c].isna().to_numpy()
        require(not bad.any(), f"{where}: column {c} has {int(bad.sum())} null/NaN value(s), first at row {_first(bad)}")
        kind, check = (("bool", pd.api.types.is_bool_dtype) if c == "agrees" else
                       ("float", pd.api.types.is_float_dtype) if SCHEMA.field(c).type == pa.float32() else
                       ("integer", pd.api.types.is_integer_dtype))
        require(check(df[c].dtype), f"{where}: column {c} must be {kind} ({SCHEMA.field(c).type}), got {df[c].dtype}")
        cols[c] = df[c].to_numpy(dtype={"bool": np.bool_, "float": np.float64, "integer": np.int64}[kind])
    for c, (lo, hi) in _DOMAINS.items():
        v, is_float = cols[c], SCHEMA.field(c).type == pa.float32()
        bad = ~((v >= lo) & (v <= hi) & (np.isfinite(v) if is_float else True))
        shown = f"{v[_first(bad)]:.7g}" if is_float else v[_first(bad)]  # float32 precision, not float64 noise
        require(not bad.any(), f"{where}: column {c} value {shown} at row {_first(bad)} is outside [{lo}, {hi}]")
    bad = cols["margin"] > cols["max_prob"]
    require(not bad.any(), f"{where}: margin exceeds max_prob at row {_first(bad)}")
    exits = np.asarray(exit_layers)
    unknown = ~np.isin(cols["exit_layer"], exits)
    require(not unknown.any(), f"{where}: row {_first(unknown)} has exit_layer "
            f"{cols['exit_layer'][_first(unknown)]}, not one of metadata exit_layers {list(exit_layers)}")
    unused = np.setdiff1d(exits, cols["exit_layer"])
    require(len(unused) == 0, f"{where}: metadata exit_layers {list(exit_layers)} but no row has exit(s) {unused.tolist()}")

    # Sort to (sequence, token, exit) order; then a complete trace reshapes to (tokens, exits).
    order = np.lexsort((cols["exit_layer"], cols["token_index"], cols["seq_id"]))
    seq, tok, ex = cols["seq_id"][order], cols["token_index"][order], cols["exit_layer"][order]
    same_token = (seq[1:] == seq[:-1]) & (tok[1:] == tok[:-1])
    dup = same_token & (ex[1:] == ex[:-1])
    if dup.any():
        i = _first(dup)
        raise EesimError(f"{where}: rows {order[i]} and {order[i + 1]} are both seq_id {seq[i]} token_index {tok[i]} "
                         f"exit_layer {ex[i]}")
    token_starts = np.flatnonzero(np.r_[True, ~same_token])
    counts = np.diff(np.r_[token_starts, len(seq)])
    if np.any(counts != len(exits)):
        t = _first(counts != len(exits))
        have = ex[token_starts[t]:token_starts[t] + counts[t]]
        raise EesimError(f"{where}: seq_id {seq[token_starts[t]]} token_index {tok[token_starts[t]]} lacks exit(s) "
                         f"{np.setdiff1d(exits, have).tolist()} (every token needs one row per exit {list(exit_layers)})")
    tok_seq, tok_idx = seq[token_starts], tok[token_starts]
    seq_starts = np.flatnonzero(np.r_[True, tok_seq[1:] != tok_seq[:-1]])
    offsets = np.r_[seq_starts, len(tok_seq)]
    position = np.arange(len(tok_seq)) - np.repeat(seq_starts, np.diff(offsets))
    if np.any(position != tok_idx):
        t = _first(position != tok_idx)
        raise EesimError(f"{where}: seq_id {tok_seq[t]} token_index values must run 0..n-1 without gaps; "
                         f"expected {position[t]}, found {tok_idx[t]}")
    prompt = cols["prompt_len"][order]
    seq_prompt = np.repeat(prompt[seq_starts * len(exits)], np.diff(offsets) * len(exits))
    bad = prompt != seq_prompt
    require(not bad.any(), f"{where}: seq_id {seq[_first(bad)]} has more than one prompt_len ({seq_prompt[_first(bad)]} "
            f"and {prompt[_first(bad)]} at row {order[_first(bad)]}); it must be the same on all its rows")

    wide = {c: cols[c][order].reshape(len(tok_seq), len(exits)) for c in (*MEASURE_COLUMNS, "argmax", "agrees")}
    agrees, argmax = wide["agrees"], wide["argmax"]
    if not agrees[:, -1].all():
        t = _first(~agrees[:, -1])
        raise EesimError(f"{where}: agrees is False at the last exit for seq_id {tok_seq[t]} token_index {tok_idx[t]} "
                         f"(row {order[(t + 1) * len(exits) - 1]}); the last exit agrees with itself by definition")
    known = (argmax != -1) & (argmax[:, -1:] != -1)
    bad = known & (agrees != (argmax == argmax[:, -1:]))
    require(not bad.any(), f"{where}: agrees contradicts argmax at row {order[_first(bad.ravel())]}")
    return ExitTrace(meta, {m: wide[m] for m in MEASURE_COLUMNS}, agrees, argmax, offsets,
                     prompt[seq_starts * len(exits)], tok_seq[seq_starts])


def read_exit_trace(path: str | os.PathLike) -> ExitTrace:
    """Read and validate a trace file; any problem raises EesimError naming the file and the problem.

    Rows named in messages are 0-based positions in the file.
    """
    path = Path(path)
    where = f"exit trace {path}"
    require(path.is_file(), f"{where}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EesimError(f"{where}: not a readable parquet file ({first_line})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    require(raw is not None, f"{where}: no '{METADATA_KEY.decode()}' key-value metadata (layers, exits, source)")
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise EesimError(f"{where}: the '{METADATA_KEY.decode()}' metadata is not valid JSON") from None
    return _frame_to_trace(table.to_pandas(), metadata, where)


# ---- synthetic traces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticExitParams:
    """Knobs of the synthetic generative story (see ``synthesize_exit_trace``). Shapes, not calibrated."""

    # lengths: lognormal (natural-log mean and sd), rounded, then clipped to [min, max]
    output_log_mean: float = 3.5  # median ~33 generated tokens
    output_log_sd: float = 0.8
    output_min: int = 1
    output_max: int = 1024
    prompt_log_mean: float = 6.0  # median ~400 prompt tokens
    prompt_log_sd: float = 1.0
    prompt_min: int = 8
    prompt_max: int = 4096
    # settle depth s: the depth fraction from which exits agree with the last layer
    settle_median: float = 0.45  # median over sequences of a sequence's mean settle depth
    settle_logit_sd: float = 0.5  # sequence difficulty: sd of that mean in logit space
    settle_concentration: float = 8.0  # alpha + beta of the per-token Beta: higher = a sequence's tokens alike
    hard_share: float = 0.15  # tokens that settle only at the last layer (s = 1)
    flip_prob: float = 0.03  # chance an intermediate exit's agreement is the opposite of (f >= s)
    # confidence: heuristic measures follow the logit sharpness * (f - s) + bias + noise
    sharpness: float = 8.0
    confidence_bias: float = 1.0  # confidence logit where the token just settles (f == s)
    shared_noise_sd: float = 0.6  # noise per (token, exit) common to max_prob, margin and entropy
    measure_noise_sd: float = 0.4  # further noise of each measure on its own
    vocab_size: int = 32000  # max_prob >= 1/vocab_size; entropy <= ln(vocab_size)
    alternatives: float = 20.0  # entropy: effective number of tokens sharing the mass max_prob leaves
    alternatives_log_sd: float = 0.5
    cosine_bias: float = 1.0  # cosine = tanh(bias + depth_slope * f + settle_slope * (f - s) + noise)
    cosine_depth_slope: float = 2.0
    cosine_settle_slope: float = 2.0
    cosine_noise_sd: float = 0.3
    classifier_sharpness: float = 16.0  # sharper and less noisy than the heuristics: a trained classifier
    classifier_noise_sd: float = 0.3

    def __post_init__(self) -> None:
        where = "SyntheticExitParams"
        for name in ("output_log_sd", "prompt_log_sd", "settle_logit_sd", "shared_noise_sd", "measure_noise_sd",
                     "alternatives_log_sd", "cosine_noise_sd", "classifier_noise_sd"):
            require(getattr(self, name) >= 0, f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        require(1 <= self.output_min <= self.output_max, f"{where}: need 1 <= output_min <= output_max")
        require(1 <= self.prompt_min <= self.prompt_max, f"{where}: need 1 <= prompt_min <= prompt_max")
        require(0 < self.settle_median < 1, f"{where}: settle_median must lie in (0, 1)")
        require(self.settle_concentration > 0, f"{where}: settle_concentration must be > 0")
        require(0 <= self.hard_share <= 1, f"{where}: hard_share must lie in [0, 1]")
        # below 1/2 a flip keeps agreement rising with depth: P(agree) = flip + (1 - 2 flip) P(s <= f)
        require(0 <= self.flip_prob < 0.5, f"{where}: flip_prob must lie in [0, 0.5)")
        require(self.vocab_size >= 2 and 1 <= self.alternatives, f"{where}: need vocab_size >= 2, alternatives >= 1")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form of 1 / (1 + exp(-x))


def synthesize_exit_trace(num_layers: int, exit_layers, num_sequences: int,
                          params: SyntheticExitParams = SyntheticExitParams(), seed: int = 0,
                          model: str = "synthetic") -> ExitTrace:
    """A synthetic trace, deterministic per seed. ``exit_layers`` includes the last layer.

    The story: each sequence draws a prompt length and a number of generated tokens (lognormal,
    rounded, clipped). Each sequence has a difficulty, its mean settle depth m (logit-normal around
    ``settle_median``); each token draws a settle depth s ~ Beta(m c, (1 - m) c), c =
    ``settle_concentration``, except a ``hard_share`` of tokens with s = 1 (they settle only at the last
    layer). An exit at depth fraction f = exit_layer / num_layers agrees iff f >= s, flipped with
    ``flip_prob`` when f < 1; the last exit always agrees. With the gap g = f - s, the measures are
    noisy monotone functions of g: max_prob = floor + (1 - floor) sigmoid(sharpness g + bias + noise)
    with floor = 1/vocab_size; margin = max_prob - runner-up, the runner-up a noisy share of
    min(max_prob, 1 - max_prob) that shrinks as confidence grows; entropy that of max_prob plus the rest
    spread over a noisy number of alternatives (so it falls as max_prob rises); cosine = tanh(...) rising
    with depth and with g; classifier = flip + (1 - 2 flip) sigmoid(classifier_sharpness g + noise),
    sharper and calibrated to the flip rate. Flips are invisible to every measure, as in a real model.
    argmax is -1 (unknown).
    """
    require(isinstance(num_sequences, int) and num_sequences >= 1,
            f"synthesize_exit_trace: num_sequences must be a positive integer, got {num_sequences!r}")
    meta = trace_metadata(num_layers, exit_layers, "synthetic", model,
                          {**asdict(params), "seed": int(seed), "num_sequences": num_sequences})
    _, _, exits = _check_metadata(meta, "synthesize_exit_trace")
    p, rng = params, np.random.default_rng(seed)

    def lengths(log_mean: float, log_sd: float, lo: int, hi: int) -> np.ndarray:
        return np.clip(np.rint(rng.lognormal(log_mean, log_sd, num_sequences)), lo, hi).astype(np.int64)

    output_lens = lengths(p.output_log_mean, p.output_log_sd, p.output_min, p.output_max)
    prompt_lens = lengths(p.prompt_log_mean, p.prompt_log_sd, p.prompt_min, p.prompt_max)
    n_tokens, shape = int(output_lens.sum()), (int(output_lens.sum()), len(exits))
    logit_median = np.log(p.settle_median / (1 - p.settle_median))
    seq_mean = _sigmoid(logit_median + rng.normal(0.0, p.settle_logit_sd, num_sequences))
    token_mean = np.repeat(seq_mean, output_lens)
    settle = rng.beta(token_mean * p.settle_concentration, (1 - token_mean) * p.settle_concentration)
    settle = np.where(rng.random(n_tokens) < p.hard_share, 1.0, settle)

    depth = np.asarray(exits, dtype=np.float64)[None, :] / num_layers
    gap = depth - settle[:, None]
    flipped = (rng.random(shape) < p.flip_prob) & (depth < 1.0)
    agrees = (gap >= 0) ^ flipped

    shared = rng.normal(0.0, p.shared_noise_sd, shape)

    def confidence_logit() -> np.ndarray:
        return p.sharpness * gap + p.confidence_bias + shared + rng.normal(0.0, p.measure_noise_sd, shape)

    floor = 1.0 / p.vocab_size
    max_prob = floor + (1 - floor) * _sigmoid(confidence_logit())
    rest = 1.0 - max_prob
    margin = max_prob - _sigmoid(-confidence_logit()) * np.minimum(max_prob, rest)
    alternatives = np.clip(p.alternatives * np.exp(rng.normal(0.0, p.alternatives_log_sd, shape)), 1, p.vocab_size - 1)
    # rest -> 0 makes rest * log(rest) -> 0; the floor at the smallest float only avoids log(0)
    entropy = -max_prob * np.log(max_prob) - rest * np.log(np.maximum(rest, np.finfo(float).tiny) / alternatives)
    cosine = np.tanh(p.cosine_bias + p.cosine_depth_slope * depth + p.cosine_settle_slope * gap
                     + rng.normal(0.0, p.cosine_noise_sd, shape))
    classifier = p.flip_prob + (1 - 2 * p.flip_prob) * _sigmoid(
        p.classifier_sharpness * gap + rng.normal(0.0, p.classifier_noise_sd, shape))

    values = {"max_prob": max_prob, "margin": margin, "entropy": entropy, "cosine": cosine, "classifier": classifier}
    return ExitTrace(meta, values, agrees, np.full(shape, -1, dtype=np.int32), np.r_[0, np.cumsum(output_lens)],
                     prompt_lens, np.arange(num_sequences))


def default_synthetic_trace(num_layers: int = 32, exit_layers=None) -> ExitTrace:
    """2,000 synthetic sequences, seed 0; exits every 4 layers plus the last unless given."""
    exits = exit_layers if exit_layers is not None else (*range(4, num_layers, 4), num_layers)
    return synthesize_exit_trace(num_layers, exits, num_sequences=2000, seed=0)
