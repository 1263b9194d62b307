"""The confidence measures, each reading one column of a recorded exit trace (eesim/exit_trace.py).

``needs_logits`` matters for cost: a softmax-based measure computes the full-vocabulary head at every
exit it checks; the hidden-state cosine needs only the hidden state, and the head runs once, at the
exit taken. The project's learned classifier (eesim/model/transformer.py, ExitClassifier) reads the
exit's max-probability, margin and entropy besides the hidden state, so it pays for the head too.
"""

from eesim.policies import register_measure
from eesim.policies.base import Measure

MAX_PROB = register_measure(Measure("max_prob", "max_prob", True, True, 0.0, 1.0))
MARGIN = register_measure(Measure("margin", "margin", True, True, 0.0, 1.0))
ENTROPY = register_measure(Measure("entropy", "entropy", False, True, 0.0))
COSINE = register_measure(Measure("cosine", "cosine", True, False, -1.0, 1.0))
CLASSIFIER = register_measure(Measure("classifier", "classifier", True, True, 0.0, 1.0))
# The oracle exits where the exit's argmax first equals the last layer's: an upper bound on quality
# at the earliest exit, read from the ``agrees`` column (threshold ignored).
ORACLE = register_measure(Measure("oracle", "agrees", True, True, 0.0, 1.0))
