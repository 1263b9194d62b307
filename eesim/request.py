"""A request as it arrives, and the sequence state the scheduler keeps for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    arrival_time: float  # seconds from the start of the workload
    prompt_len: int
    output_len: int  # tokens to generate (the simulator's stop condition; a real model may stop earlier at EOS)
    prompt_tokens: tuple[int, ...] | None = None  # real token ids, for the GPU executor in model mode


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Mutable serving state of one request.

    ``num_computed`` counts positions whose KV has been written by a forward pass (prompt and generated
    tokens alike). A pass that brings ``num_computed`` up to ``total_len`` emits one new token.
    """

    request: Request
    status: Status = Status.WAITING
    num_computed: int = 0
    num_generated: int = 0
    blocks: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    first_scheduled_time: float = -1.0
    token_times: list[float] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    agrees: list[bool] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    num_preemptions: int = 0
    # the simulator's exit behaviour: generated token t replays trace row trace_offset + t % trace_len
    trace_offset: int = 0
    trace_len: int = 0

    @property
    def seq_id(self) -> int:
        return self.request.request_id

    @property
    def total_len(self) -> int:
        return self.request.prompt_len + self.num_generated

    @property
    def in_decode(self) -> bool:
        """Only the last token is uncomputed and the prompt is done: the next pass is a decode step."""
        return self.num_computed == self.total_len - 1 and self.num_generated > 0

    @property
    def remaining_to_compute(self) -> int:
        return self.total_len - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.num_generated >= self.request.output_len
