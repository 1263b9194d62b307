"""EE-LLM / FREE style: owed tokens run again, in full, through the layers they skipped, as extra
rows beside the sequence's next token that goes deeper. Yields the K/V full depth would produce."""

from eesim.kv_policy import KVPolicy
from eesim.policies import register_kv_policy

RECOMPUTE = register_kv_policy(KVPolicy(
    "recompute", work="full_layers", settle="own_pass",
    description="re-run owed tokens through skipped layers with the sequence's next deep token"))
