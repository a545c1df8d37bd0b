"""Captured CUDA graphs of a network call, for the small batches where launches, not arithmetic, cost the time.

At batch 1 a 12 x 768 forward is ~2e11 FLOPs, a fraction of a millisecond of the GPU's arithmetic, but
hundreds of kernel launches (and torch.compile's guards) from Python. A captured graph replays all of
them with one launch. The sampler's calls have a different number of sequences at each step, so there
is one graph per (sequences, length, time-conditioned) shape, captured at its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

HiddenFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [n, L] static input, copied into before each replay
    sigma: torch.Tensor | None  # [n] static input
    output: torch.Tensor  # [n, L, d], overwritten by each replay


class GraphedHidden:
    """fn(input_ids [n, L], sigma [n] | None) -> hidden [n, L, d], replayed from CUDA graphs for n <= max_rows.

    Larger calls run fn directly. fn must be free of host synchronisation and randomness (an eval-mode
    network under no_grad). Graphs share one memory pool: calls are sequential, so they can share their
    scratch memory. The returned tensor is a copy, since the graph's output buffer is overwritten by
    its next replay.
    """

    def __init__(self, fn: HiddenFn, max_rows: int) -> None:
        self.fn, self.max_rows = fn, max_rows
        self.pool: tuple[int, int] | None = None  # made at the first capture: calls above max_rows need no GPU
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}

    def __call__(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        n, length = input_ids.shape
        if n > self.max_rows:
            return self.fn(input_ids, sigma)
        key = (n, length, sigma is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(input_ids, sigma)
        g = self.graphs[key]
        g.input_ids.copy_(input_ids)
        if sigma is not None:
            g.sigma.copy_(sigma)
        g.graph.replay()
        return g.output.clone()

    def prepare(self, rows: int, length: int, with_sigma: bool, device: torch.device) -> None:
        """Capture the graphs of every call of 1..rows sequences of `length` tokens now (outside any timing)."""
        for n in range(1, min(rows, self.max_rows) + 1):
            if (n, length, with_sigma) not in self.graphs:
                ids = torch.zeros((n, length), dtype=torch.long, device=device)
                sigma = torch.zeros(n, device=device) if with_sigma else None
                self.graphs[(n, length, with_sigma)] = self._capture(ids, sigma)

    def _capture(self, input_ids: torch.Tensor, sigma: torch.Tensor | None) -> _Graph:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_ids = input_ids.clone()
        static_sigma = sigma.clone() if sigma is not None else None
        # Warm up on a side stream (compilation, autotuning, cuBLAS workspaces), as capture requires.
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_ids, static_sigma)
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(static_ids, static_sigma)
        return _Graph(graph, static_ids, static_sigma, output)
