"""Keep the exit hidden state; project each skipped layer's K/V lazily, riding along in the next
batch pass that runs that layer. Same values as fill; no extra weight reads; a hidden-state buffer."""

from eesim.kv_policy import KVPolicy
from eesim.policies import register_kv_policy

COPY_HIDDEN = register_kv_policy(KVPolicy(
    "copy_hidden", work="kv_projection", settle="batch_pass",
    description="keep the exit hidden state, project K/V in the next pass that runs each layer"))
