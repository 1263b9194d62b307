"""A profile measured at more exits than a model has, as if measured at the model's exits: ``restrict_exits``."""

from __future__ import annotations

import numpy as np

from eesim.errors import EesimError
from eesim.model_spec import ModelSpec
from eesim.profile_data import Profile


def restrict_exits(profile: Profile, model: ModelSpec) -> Profile:
    """``profile`` (measured at its model's exits) as if measured at ``model``'s exits, a subset of them.

    ProfileCostModel prices a model with exactly the profile's exits. Measurements that do not depend on
    the exits (full-depth decode, prefill, mixed without checks, fill, proj and recompute without checks,
    schedule, fixed) are kept as they are. Decode passes that stop at a kept exit e ran a check at every profiled exit
    before e; the cost model takes out the checks at the model's exits before e, so the checks at the
    dropped ones are taken out here (priced from the profile's own check grid, as the cost model does).
    Check measurements (``check``, ``check_eager``, ``mixed`` with checks) timed all the profile's
    exits at once; they are rescaled to the model's number of checks, keeping the per-check cost (proj and
    recompute points timed with checks lose the dropped exits' checks, priced from ``check_eager``). The
    general path's cost is a part per step plus a part per check: where the profile also timed it with one
    check (``check_eager_one``), ``check_eager`` becomes that point plus the per-check part of each further
    check (the difference of the two points per check), and the eager checks dropped elsewhere are priced
    at that per-check part; profiles without those points scale the whole excess with the checks, as before
    (on the H100 that priced the general path's step at three exits ~0.24 ms low: docs/fidelity.md).
    Decode and leave points at dropped exits are removed; leave points at kept exits lose the dropped exits'
    checks before them (graphed for ``leave``, eager for the owing kinds).
    """
    # imported here, not at the top: profile_cost imports this module
    from eesim.profile_cost import ProfileCostModel
    from eesim.profile_data import spec_to_meta

    pm = profile.model
    if tuple(pm.exit_layers) == tuple(model.exit_layers):
        return profile
    if not set(model.exit_layers) <= set(pm.exit_layers):
        raise EesimError(f"profile {profile.path or '(in memory)'!r}: its exits {list(pm.exit_layers)} do not include "
                         f"the model's {list(model.exit_layers)}")
    ref = ProfileCostModel(profile, pm, kv_policy="fill", include_schedule=False)
    ratio = (model.num_segments - 1) / (pm.num_segments - 1)
    f = profile.frame.copy()
    comp = f["component"].to_numpy()
    med = f["median_s"].to_numpy(dtype=np.float64).copy()
    eager_tab, one_by_batch = _eager_per_check(f, pm, ref)
    for name in ("check", "check_eager"):
        m = comp == name
        if m.any():
            full = ref.g_full(f.loc[m, "batch"].to_numpy(float), f.loc[m, "context"].to_numpy(float))[0]
            med[m] = full + (med[m] - full) * ratio
            if name == "check_eager" and one_by_batch:  # the part per step whole, the per-check part scaled
                for i in np.flatnonzero(m):
                    b, c = int(f["batch"].iat[i]), int(f["context"].iat[i])
                    if (b, c) in one_by_batch:  # (never above the all-exits point, which checked more)
                        one, every = one_by_batch[(b, c)]
                        med[i] = min(one + max(model.num_segments - 2, 0) * eager_tab[min(b, ref.max_rows)], every)
    # owed points timed with the checks (checks > 0): their checks rescaled as the general path's are
    owed_checked = np.isin(comp, ("proj", "recompute")) & (f["checks"].to_numpy() > 0)
    if owed_checked.any():
        rows_o = np.minimum(f.loc[owed_checked, "batch"].to_numpy().astype(np.int64), ref.max_rows)
        med[owed_checked] -= (pm.num_segments - model.num_segments) * eager_tab[rows_o]
    no_checks = f[(f["component"] == "mixed") & (f["checks"] == 0)].set_index(["batch", "tokens", "context"])["median_s"]
    mixed_checked = (comp == "mixed") & (f["checks"].to_numpy() > 0)
    for i in np.flatnonzero(mixed_checked):
        base = no_checks.get((f["batch"].iat[i], f["tokens"].iat[i], f["context"].iat[i]), np.nan)
        if np.isfinite(base):
            med[i] = base + (med[i] - base) * ratio
    L = model.num_layers
    layers = f["layers"].to_numpy()
    decode = comp == "decode"
    keep = ~decode | np.isin(layers, [*model.exit_layers, L])
    inner = decode & keep & (layers < L)
    k_prof = {e: i for i, e in enumerate(pm.all_exits)}
    k_model = {e: i for i, e in enumerate(model.all_exits)}
    dropped = np.array([k_prof[int(e)] - k_model[int(e)] for e in layers[inner]], dtype=np.float64)
    rows = np.minimum(f["batch"].to_numpy().astype(np.int64), ref.max_rows)
    med[inner] -= dropped * ref.chk_tab[rows[inner]]
    # leave points (every row out at e after the checks at every profiled exit up to e): kept at the model's
    # exits, the dropped exits' checks taken out, graphed ones from ``leave``, eager ones from the owing kinds
    leave = np.isin(comp, ("leave", "leave_owing_proj", "leave_owing_recompute"))
    keep &= ~leave | np.isin(layers, model.exit_layers)
    kept_leave = leave & keep
    if kept_leave.any():
        drop_l = np.array([k_prof[int(e)] - k_model[int(e)] for e in layers[kept_leave]], dtype=np.float64)
        tab = np.where(comp[kept_leave] == "leave", ref.chk_tab[rows[kept_leave]], eager_tab[rows[kept_leave]])
        med[kept_leave] -= drop_l * tab
    f["median_s"] = med
    checks = np.isin(comp, ("check", "check_eager")) | mixed_checked | owed_checked
    f.loc[checks, "checks"] = model.num_segments - 1
    if kept_leave.any():
        f.loc[kept_leave, "checks"] = [k_model[int(e)] + 1 for e in layers[kept_leave]]
    meta = dict(profile.meta)
    meta["model"] = spec_to_meta(model)
    meta["derived"] = f"exits {list(pm.exit_layers)} restricted to {list(model.exit_layers)} (restrict_exits)"
    return Profile(f[keep].reset_index(drop=True), meta, profile.path)


def _eager_per_check(frame, pm: ModelSpec, ref) -> tuple[np.ndarray, dict[tuple[int, int], tuple[float, float]]]:
    """(seconds per eager check by rows, {(batch, context): (the ``check_eager_one`` point, the ``check_eager``
    point)}). With those points (and three exits or more), a check's share is the difference of the general path's
    all-exits and one-exit points over the checks between them (not below 0), interpolated over the rows; without
    them, the cost model's ``chk_eager_tab`` (the whole excess over the checks) and no points."""
    one = frame[(frame["component"] == "check_eager_one") & (frame["checks"] == 1)]
    every = frame[(frame["component"] == "check_eager") & (frame["checks"] == pm.num_segments - 1)]
    pairs = one.merge(every, on=["batch", "context"], suffixes=("_one", "_all"))
    if pm.num_segments < 3 or not len(pairs):
        return ref.chk_eager_tab, {}
    pairs = pairs.sort_values("batch")
    per = np.maximum((pairs["median_s_all"] - pairs["median_s_one"]).to_numpy() / (pm.num_segments - 2), 0.0)
    tab = np.interp(np.arange(len(ref.chk_eager_tab)), pairs["batch"].to_numpy(float), per)
    tab[0] = 0.0
    keys = zip(pairs["batch"].astype(int), pairs["context"].astype(int))
    return tab, dict(zip(keys, zip(pairs["median_s_one"].astype(float), pairs["median_s_all"].astype(float))))
