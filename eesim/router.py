"""Which replica serves an arriving request."""

from __future__ import annotations

from typing import Protocol, Sequence as Seq

from eesim.errors import EesimError


class Replica(Protocol):
    @property
    def outstanding(self) -> int: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, replicas: Seq[Replica]) -> int:
        chosen = self._next % len(replicas)
        self._next += 1
        return chosen


class LeastOutstanding:
    """The replica with the fewest unfinished requests; ties go to the lowest index."""

    name = "least_outstanding"

    def pick(self, replicas: Seq[Replica]) -> int:
        return min(range(len(replicas)), key=lambda i: replicas[i].outstanding)


ROUTERS = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding}


def make_router(name: str) -> RoundRobin | LeastOutstanding:
    if name not in ROUTERS:
        raise EesimError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
    return ROUTERS[name]()
