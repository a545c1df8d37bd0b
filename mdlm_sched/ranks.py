"""This process's place in a torchrun job (its rank), and the collectives that train and sweep use.

torchrun starts one copy of the command per rank, with RANK, WORLD_SIZE and LOCAL_RANK in the
environment; `launch_context()` reads them (ONE_PROCESS without torchrun, whose collectives do nothing,
so that one code path serves both). This module loads torch only when a collective runs, because the CLI
reads the rank before every command, before its input is checked (`distributed.distributed` joins the
process group).

Failures: a rank that raises while the others wait in a collective would leave them waiting for
ever. Work that can fail on one rank only (out of memory, say) runs inside `gather_all` (or
`map_sharded`, `on_main`), which hands every rank the result or the error: if any rank failed,
every rank raises that error, so that all of them take the same branch afterwards.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank's index on its host, which is its GPU's index

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, validates and writes files."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's items of n, dealt round-robin (rank, rank + world_size, ...): balanced for sorted costs too."""
        return range(self.rank, n, self.world_size)

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (n must be a multiple of world_size)."""
        per_rank = n // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world_size > 1:
            _collectives().barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """value averaged over the ranks, on every rank."""
        if self.world_size == 1:
            return value
        total = value.clone()
        _collectives().all_reduce(total)
        return total / self.world_size

    def gather_all(self, compute: Callable[[], T]) -> list[T]:
        """compute() on this rank; every rank's result, in rank order, on every rank (python objects, pickled).

        If compute() raised on any rank, every rank raises the error of the lowest such rank instead.
        """
        if self.world_size == 1:
            return [compute()]
        error: Exception | None = None
        try:
            mine: tuple[bool, Any] = (True, compute())
        except Exception as exc:  # raised below, on every rank, once all of them know
            error, mine = exc, (False, _portable(exc))
        outcomes: list[Any] = [None] * self.world_size
        _collectives().all_gather_object(outcomes, mine)
        for rank, (ok, value) in enumerate(outcomes):
            if not ok:
                if rank == self.rank:
                    raise error
                value.add_note(f"(raised on rank {rank} of {self.world_size})")
                raise value
        return [value for _, value in outcomes]

    def map_sharded(self, n: int, fn: Callable[[int], T]) -> list[T]:
        """[fn(0), ..., fn(n - 1)] on every rank, each rank computing its share(n) (errors as in gather_all)."""
        parts = self.gather_all(lambda: [fn(k) for k in self.share(n)])
        out: list[Any] = [None] * n
        for rank, part in enumerate(parts):
            out[rank::self.world_size] = part
        return out

    def on_main(self, compute: Callable[[], T]) -> T:
        """compute() on rank 0 only (reading or writing a shared file); its result, or its error, on every rank."""
        return self.gather_all(compute if self.is_main else lambda: None)[0]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body before the others do: it fills a cache (tokenised data) that they then read."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


ONE_PROCESS = DistContext()


def launch_context() -> DistContext:
    """This process's DistContext from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); ONE_PROCESS outside."""
    if "WORLD_SIZE" not in os.environ:
        return ONE_PROCESS
    return DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def _collectives() -> ModuleType:
    """torch.distributed, imported only when a collective runs (several ranks)."""
    import torch.distributed

    return torch.distributed


def _portable(exc: Exception) -> Exception:
    """exc if it survives pickling (to be raised on the other ranks as it is), else a RuntimeError with its text."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
