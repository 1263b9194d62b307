"""The seed paper's KV rule: before the iteration ends, project the exit hidden state through every
skipped layer's input norm, K/V projection and rotary (CALM's state propagation)."""

from eesim.kv_policy import KVPolicy
from eesim.policies import register_kv_policy

FILL = register_kv_policy(KVPolicy(
    "fill", work="kv_projection", settle="iteration_end",
    description="project skipped layers' K/V from the exit hidden state before the iteration ends"))
