"""Early-exit Llama model code: the decoder, confidence measures, checkpoints, training and trace recording.

Needs the optional ``model`` extra (torch, safetensors, tokenizers); the simulator itself does not.
"""

from eesim.model.checkpoint import load_checkpoint, load_hf_llama, save_checkpoint
from eesim.model.confidence import MEASURES
from eesim.model.transformer import (
    KV_POLICIES,
    EarlyExitLlama,
    ExitOutputs,
    KVCache,
    StepOutput,
    greedy_generate,
)

__all__ = ["EarlyExitLlama", "ExitOutputs", "KVCache", "KV_POLICIES", "MEASURES", "StepOutput", "greedy_generate",
           "load_checkpoint", "load_hf_llama", "save_checkpoint"]
