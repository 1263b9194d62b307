"""What a KV policy declares: the work a skipped layer is owed, and when that work is done.

When a token exits after layer e, layers e+1..L have no K/V for its position. Every policy makes that
K/V eventually (or the sequence ends first); they differ in *what* runs and *when*:

- ``work``: ``"kv_projection"`` runs each owed layer's input norm, K/V projection and rotary on the
  token's kept hidden state (the exit layer's output); ``"full_layers"`` runs the token through the
  owed layers in full (attention and MLP), which yields the K/V full depth would have produced.
- ``settle``: ``"iteration_end"`` settles every owed layer before the iteration ends (extra weight
  reads for layers the batch did not run); ``"batch_pass"`` settles the owed layers that a batch pass
  runs anyway, this one or a later one (the rows ride along in that layer's projection);
  ``"own_pass"`` settles them when the sequence's own next token goes deeper, up to its depth.

Both executors read these two fields: the simulator to price the work, the GPU executor to run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from eesim.errors import require

Work = Literal["kv_projection", "full_layers"]
Settle = Literal["iteration_end", "batch_pass", "own_pass"]


@dataclass(frozen=True)
class KVPolicy:
    name: str
    work: Work
    settle: Settle
    description: str = ""

    def __post_init__(self) -> None:
        require(self.work in ("kv_projection", "full_layers"),
                f"KV policy {self.name!r}: work must be 'kv_projection' or 'full_layers', got {self.work!r}")
        require(self.settle in ("iteration_end", "batch_pass", "own_pass"),
                f"KV policy {self.name!r}: settle must be 'iteration_end', 'batch_pass' or 'own_pass', "
                f"got {self.settle!r}")

    @property
    def keeps_hidden_state(self) -> bool:
        """Owed positions wait with their exit hidden state in a buffer (memory the policy costs)."""
        return self.settle != "iteration_end"

    @property
    def settles_exits_after_the_pass(self) -> bool:
        """What this pass's exits owe can be settled once the pass is over: projected then (kv_projection, up to
        the depth the policy asks) or left for the row's own next pass (own_pass). Not so for full_layers
        settled by the batch or the iteration, whose owed rows run as extra rows through the pass itself.
        (The GPU executor runs a decode step owing nothing on its graphed path for such policies; the
        profile-backed cost model prices those steps so.)"""
        return self.work == "kv_projection" or self.settle == "own_pass"
