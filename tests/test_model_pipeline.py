"""Corpus split, a few training steps on a tiny corpus, and trace recording from that checkpoint."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

from eesim.model import record, train  # noqa: E402
from eesim.model.checkpoint import load_checkpoint  # noqa: E402
from eesim.model.corpus import is_heldout, split_corpus  # noqa: E402


def _source(i: int) -> str:
    return "\n".join(
        f"def func_{i}_{j}(x, y={j}):\n    \"\"\"Add things {j}.\"\"\"\n    if x > {i}:\n        return x + y * {j}\n"
        f"    for k in range(y):\n        x = x - k  # step {k_}\n    return [x, y, '{i}-{j}']\n"
        for j, k_ in zip(range(12), range(3, 15)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    held = i = 0
    while held < 3 or i < 60:  # enough files that the 2% hash split holds some out
        sub = root / f"pkg{i % 5}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i}.py").write_text(_source(i))
        held += is_heldout(f"tiny/pkg{i % 5}/mod_{i}.py")
        i += 1
    (root / "notes.txt").write_text("not python")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("skipped = 1\n")
    return root


def test_split_deterministic_and_disjoint(corpus):
    roots = [("tiny", corpus)]
    a, b = split_corpus(roots), split_corpus(roots)
    assert [f.key for f in a.train] == [f.key for f in b.train] and [f.key for f in a.val] == [f.key for f in b.val]
    train_keys, val_keys = {f.key for f in a.train}, {f.key for f in a.val}
    assert not train_keys & val_keys and len(val_keys) >= 3
    assert all(k.endswith(".py") and "__pycache__" not in k for k in train_keys | val_keys)
    capped = split_corpus(roots, max_train_mb=0.01)
    assert sum(f.size for f in capped.train) < sum(f.size for f in a.train)
    assert {f.key for f in capped.train} <= train_keys
    assert [f.key for f in capped.val] == [f.key for f in a.val]  # held-out set does not depend on the cap


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    rc = train.main(["--out", str(out), "--corpus-root", f"tiny={corpus}", "--steps", "3", "--batch", "2",
                     "--seq-len", "64", "--eval-batches", "1", "--eval-every", "2", "--clf-steps", "2",
                     "--log-every", "1", "--tokenizer-sample-mb", "1", "--time-budget-s", "60"])
    assert rc == 0
    return out


def test_train_writes_loadable_checkpoint_and_card(checkpoint):
    model = load_checkpoint(checkpoint)
    assert model.spec.name == "small" and model.lm_head.weight is model.embed_tokens.weight
    assert (checkpoint / "tokenizer.json").is_file()
    assert (checkpoint / "model.safetensors").stat().st_size <= 32 * 2**20
    card = json.loads((checkpoint / "card.json").read_text())
    assert card["training"]["steps"] == 3 and card["training"]["tokens_seen"] == 3 * 2 * 64
    assert set(card["heldout"]) == {"2", "4", "6", "8"}
    for v in card["heldout"].values():
        assert v["loss"] > 0 and v["perplexity"] > 1 and 0 <= v["agree_with_last"] <= 1
    assert card["heldout"]["8"]["agree_with_last"] == 1.0
    assert card["corpus"]["train_files"] > 0 and card["corpus"]["train_tokens"] > 0
    assert len(card["heldout_history"]) == 1
    assert card["hardware"]


def test_record_writes_exact_schema(checkpoint, corpus, tmp_path):
    out = tmp_path / "traces" / "exit_trace.parquet"
    pol = tmp_path / "traces" / "kv.csv"
    rc = record.main(["--checkpoint", str(checkpoint), "--out", str(out), "--corpus-root", f"tiny={corpus}",
                      "--num-prompts", "3", "--batch", "2", "--prompt-max", "24", "--cont-min", "2",
                      "--cont-max", "4", "--policies-out", str(pol), "--policy-prompts", "1", "--policy-cont", "3",
                      "--thresholds", "0.0,0.9"])
    assert rc == 0
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == record.TRACE_SCHEMA
    assert [f.name for f in table.schema] == ["seq_id", "prompt_len", "token_index", "exit_layer", "max_prob",
                                              "margin", "entropy", "cosine", "classifier", "argmax", "agrees"]
    assert table.schema.field("exit_layer").type == pa.int16() and table.schema.field("agrees").type == pa.bool_()
    meta = json.loads(table.schema.metadata[b"eesim"])
    assert meta["num_layers"] == 8 and meta["exit_layers"] == [2, 4, 6, 8]
    assert meta["source"] == "recorded" and meta["schema_version"] == 1 and meta["model"] == "small"
    assert meta["params"]["seed"] == 0
    df = table.to_pandas()
    assert df.seq_id.nunique() == 3
    assert set(df.exit_layer) == {2, 4, 6, 8}
    assert len(df) == 4 * df.groupby("seq_id").token_index.max().add(1).sum()
    last = df[df.exit_layer == 8]
    assert last.agrees.all() and (last.classifier == 1.0).all()
    assert ((df.max_prob > 0) & (df.max_prob <= 1)).all() and (df.entropy >= 0).all()
    assert not list(out.parent.glob("*.tmp"))
    res = (tmp_path / "traces" / "kv.csv").read_text().splitlines()
    assert res[0].startswith("policy,threshold,sequences") and len(res) == 1 + 1 + 3 * 2
    assert (tmp_path / "traces" / "kv.md").is_file()


def test_policy_eval_threshold_zero_always_exits_first(checkpoint, corpus):
    model = load_checkpoint(checkpoint)
    prompt = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    df = record.evaluate_kv_policies(model, [(prompt, 4)], torch.device("cpu"), thresholds=(0.0,),
                                     policies=("fill", "recompute"))
    assert list(df.policy) == ["full", "fill", "recompute"]
    assert df.loc[0, "exit_8_share"] == 1.0 and df.loc[0, "teacher_forced_agreement"] == 1.0
    # threshold 0 exits at the first exit on every decode step (the first token comes from the full-depth prefill)
    assert df.loc[1, "exit_2_share"] == pytest.approx(3 / 4) and df.loc[2, "exit_2_share"] == pytest.approx(3 / 4)
