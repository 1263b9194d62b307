"""The simulator end to end: conservation, determinism, fast-forward = step by step, replicas,
preemption, and the cost model's sanity."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from eesim.cost_model import AnalyticalCostModel
from eesim.errors import EesimError
from eesim.hardware import HARDWARE_PRESETS
from eesim.scheduler import SchedulerConfig
from eesim.simulator import SimConfig, simulate
from eesim.workload import synthetic_workload

H100 = HARDWARE_PRESETS["h100"]


@pytest.fixture(scope="module")
def workload(llama7b):
    return synthetic_workload(rate=6.0, duration_s=20, seed=3).clip(llama7b.max_context)[0]


def config(model, trace, rule="all_confident", kv="fill", **kw):
    return SimConfig(model, H100, trace, rule, kv, **kw)


@pytest.mark.parametrize("rule, kv", [("full", "fill"), ("all_confident", "fill"), ("per_sequence", "copy_hidden"),
                                      ("quorum", "recompute")])
def test_every_request_finishes_exactly_once_with_all_its_tokens(llama7b, synthetic_trace_7b, workload, rule, kv):
    result = simulate(workload, config(llama7b, synthetic_trace_7b, rule, kv))
    req = result.requests
    assert len(req) == workload.num_requests and req["request_id"].is_unique
    expected = {r.request_id: r.output_len for r in workload.requests}
    assert (req["output_len"] == req["request_id"].map(expected)).all()
    assert result.summary["output_tokens"] == sum(expected.values())
    assert (req["ttft"] > 0).all() and (req["queueing_delay"] >= 0).all()
    assert (req["finish"] >= req["first_token"]).all()
    it = result.iterations
    assert (it["end"] > it["start"]).all()
    for _, rows in it.groupby("replica"):  # iterations of one replica never overlap
        assert (rows["start"].to_numpy()[1:] >= rows["end"].to_numpy()[:-1] - 1e-12).all()


def test_full_depth_is_exact_and_exits_save_layers(llama7b, synthetic_trace_7b, workload):
    full = simulate(workload, config(llama7b, synthetic_trace_7b, "full")).summary
    assert full["quality"] == 1.0 and full["mean_layers"] == 32 and full["forced_exits"] == 0
    per_seq = simulate(workload, config(llama7b, synthetic_trace_7b, "per_sequence")).summary
    assert per_seq["mean_layers"] < 32 and per_seq["quality"] < 1.0
    oracle = simulate(workload, config(llama7b, synthetic_trace_7b, "per_sequence", measure="oracle")).summary
    assert oracle["quality"] == 1.0 and oracle["mean_layers"] < 32  # exits only where it agrees


def test_same_seed_same_result_bit_for_bit(llama7b, synthetic_trace_7b, workload):
    a = simulate(workload, config(llama7b, synthetic_trace_7b, "quorum", "copy_hidden", seed=7))
    b = simulate(workload, config(llama7b, synthetic_trace_7b, "quorum", "copy_hidden", seed=7))
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.iterations, b.iterations, check_exact=True)
    c = simulate(workload, config(llama7b, synthetic_trace_7b, "quorum", "copy_hidden", seed=8))
    assert not a.requests["agreement"].equals(c.requests["agreement"])


@pytest.mark.parametrize("rule", ["full", "all_confident", "per_sequence", "quorum"])
def test_fast_forwarded_runs_equal_step_by_step(llama7b, synthetic_trace_7b, workload, rule):
    fast = simulate(workload, config(llama7b, synthetic_trace_7b, rule, "fill"))
    slow = simulate(workload, config(llama7b, synthetic_trace_7b, rule, "fill", max_run_steps=1))
    assert len(fast.iterations) == len(slow.iterations)
    for col in ("batch_size", "prefill_tokens", "decode_rows", "early_exits", "forced_exits", "batch_reach",
                "proj_rows", "syncs", "kv_utilisation"):
        np.testing.assert_array_equal(fast.iterations[col], slow.iterations[col], err_msg=col)
    for col in ("output_len", "mean_layers", "forced_exits", "agreement", "preemptions"):
        np.testing.assert_array_equal(fast.requests[col], slow.requests[col], err_msg=col)
    for col in ("ttft", "e2e", "itl_mean"):  # same sums, added in a different order
        np.testing.assert_allclose(fast.requests[col], slow.requests[col], rtol=1e-9, err_msg=col)


def test_preemption_under_a_small_cache_loses_nothing(llama7b, synthetic_trace_7b, workload):
    tight = SchedulerConfig(num_blocks=600, block_size=16)
    result = simulate(workload, config(llama7b, synthetic_trace_7b, "all_confident", "copy_hidden", scheduler=tight))
    assert result.summary["preemptions"] > 0
    assert result.summary["output_tokens"] == sum(r.output_len for r in workload.requests)
    assert result.iterations["kv_utilisation"].max() <= 1.0


def test_replicas_share_the_load(llama7b, synthetic_trace_7b):
    heavy = synthetic_workload(rate=20.0, duration_s=15, seed=4).clip(llama7b.max_context)[0]
    one = simulate(heavy, config(llama7b, synthetic_trace_7b)).summary
    for router in ("round_robin", "least_outstanding"):
        two = simulate(heavy, config(llama7b, synthetic_trace_7b, replicas=2, router=router))
        assert set(two.iterations["replica"]) == {0, 1}
        assert two.summary["ttft_p90"] < one["ttft_p90"]
        assert two.summary["output_tokens"] == one["output_tokens"]


def test_bad_configuration_is_refused(llama7b, synthetic_trace_7b, workload):
    with pytest.raises(EesimError, match="replicas must be at least 1"):
        simulate(workload, config(llama7b, synthetic_trace_7b, replicas=0))
    with pytest.raises(EesimError, match="unknown router"):
        simulate(workload, config(llama7b, synthetic_trace_7b, router="random"))
    small = dataclasses.replace(H100, memory_bytes=10e9)
    with pytest.raises(EesimError, match="does not fit"):
        simulate(workload, dataclasses.replace(config(llama7b, synthetic_trace_7b), hardware=small))
    with pytest.raises(EesimError, match="exit trace has exits"):
        simulate(workload, config(llama7b.with_exits((8, 16, 24)), synthetic_trace_7b))


def test_work_records_the_plans_decode_rows_and_prompt_chunks(llama7b):
    """Several prompts' chunks in one step look like one long chunk in the totals; the record says how many."""
    from eesim.plan import IterationPlan
    from eesim.policies import exit_rule, kv_policy
    from eesim.work import WorkCounter

    counter = WorkCounter(llama7b, kv_policy("fill"), exit_rule("full"), True)
    num_new = np.array([512, 300, 1, 1, 1])
    decode = num_new == 1
    plan = IterationPlan(0, [None] * 5, num_new, np.array([0, 100, 40, 50, 60]), decode, np.ones(5, dtype=bool),
                         [[] for _ in range(5)], np.zeros(5, dtype=np.int64))
    work = counter.count(plan, np.full((1, 5), llama7b.num_segments - 1))
    assert work.decode_rows.tolist() == [3.0] and work.prompt_chunks.tolist() == [2.0]
    assert work.full_rows[0, 0] - work.decode_rows[0] == 812  # the chunks' tokens
    one = work.step(0)
    assert one.prompt_chunks.tolist() == [2.0] and one.decode_rows.tolist() == [3.0]
    # a model without exits: one segment, whose check column the counter zeroes (the decode rows stay)
    flat = llama7b.with_exits(())
    work = WorkCounter(flat, kv_policy("fill"), exit_rule("all_confident"), True).count(plan, np.zeros((1, 5), int))
    assert work.decode_rows.tolist() == [3.0] and work.prompt_chunks.tolist() == [2.0]


def test_cost_model_is_monotone_and_near_the_floor(llama7b):
    from eesim.plan import IterationPlan
    from eesim.policies import exit_rule, kv_policy
    from eesim.work import WorkCounter

    cost = AnalyticalCostModel(llama7b, H100)
    counter = WorkCounter(llama7b, kv_policy("fill"), exit_rule("full"), True)

    def decode_time(batch, context, exit_index=7):
        ones = np.ones(batch, dtype=np.int64)
        plan = IterationPlan(0, [None] * batch, ones, ones * (context - 1), ones.astype(bool), ones.astype(bool),
                             [[] for _ in range(batch)], ones)
        return float(cost.iteration_time(counter.count(plan, np.full((1, batch), exit_index)))[0])

    times = [decode_time(b, 512) for b in (1, 8, 64, 256)]
    assert times == sorted(times)
    assert decode_time(8, 2048) > decode_time(8, 512)
    assert decode_time(1, 512, exit_index=3) < decode_time(1, 512)  # fewer layers, less time
    # batch 1, context 512: the weights and the KV over the achieved bandwidth, plus the fixed overhead
    floor = (llama7b.num_layers * llama7b.weight_bytes_per_layer + llama7b.head_weight_bytes
             + 512 * llama7b.kv_bytes_per_token) / (H100.read_bandwidth * H100.bandwidth_fraction)
    assert decode_time(1, 512) == pytest.approx(floor + H100.iteration_overhead_s, rel=0.01)
