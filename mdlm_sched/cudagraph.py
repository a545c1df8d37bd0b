"""Captured CUDA graphs of a network call, for the small batches where launches, not arithmetic, cost the time.

At batch 1 a 12 x 768 forward is ~2e11 FLOPs, a fraction of a millisecond of the GPU's arithmetic, but
hundreds of kernel launches (and torch.compile's guards) from Python. A captured graph replays all of
them with one launch. The sampler's calls have a different number of sequences at each step, so there
is one graph per shape, captured at its first call (or ahead of a timed run with `prepare`):
- GraphedHidden, the full forward: one graph per (sequences, length, time-conditioned);
- GraphedLatent, the latent cache's two steps (latent_cache.py): one per (sequences, length, time-conditioned)
  for a refresh, and per (sequences, padded width, ...) for a partial step, whose columns are padded to the next
  power of two (at least 2) so that about log2(L) widths cover every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

HiddenFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# (input_ids, sigma, cache, rows, positions or None) -> hidden: MDLMDenoiser.latent_hidden's arguments
LatentFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, "torch.Tensor | None"],
                    torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor | None, ...]  # static inputs, copied into before each replay
    output: torch.Tensor  # overwritten by each replay
    held: tuple[torch.Tensor, ...]  # tensors the graph reads or writes in place: kept alive while it can replay


class _Captures:
    """Graphs of fn(*inputs, *held), one per key, in one memory pool (calls are sequential, so they can share
    their scratch memory). `inputs` are copied into the graph's own buffers before each replay; `held` tensors
    (a cache written in place, tables) are captured by address, so a key must name them (their data_ptr)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.pool: tuple[int, int] | None = None  # made at the first capture: a graph-free run needs no GPU
        self.graphs: dict[tuple, _Graph] = {}

    def replay(self, key: tuple, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """fn's output for these inputs, from the key's graph (captured already); the graph's own buffer."""
        g = self.graphs[key]
        for static, value in zip(g.inputs, inputs):
            if static is not None:
                static.copy_(value)
        g.graph.replay()
        return g.output

    def capture(self, key: tuple, inputs: Sequence[torch.Tensor | None], held: Sequence[torch.Tensor] = ()) -> None:
        """Capture the key's graph with these example inputs (fn runs three times: twice to warm up, once captured)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static = tuple(x.clone() if x is not None else None for x in inputs)
        device = next(x for x in static if x is not None).device
        # Warm up on a side stream (compilation, autotuning, cuBLAS workspaces), as capture requires.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*static, *held)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static, *held)
        self.graphs[key] = _Graph(graph, static, output, tuple(held))


class GraphedHidden:
    """fn(input_ids [n, L], sigma [n] | None) -> hidden [n, L, d], replayed from CUDA graphs for n <= max_rows.

    Larger calls run fn directly. fn must be free of host synchronisation and randomness (an eval-mode
    network under no_grad). The returned tensor is a copy, since the graph's output buffer is overwritten by
    its next replay.
    """

    def __init__(self, fn: HiddenFn, max_rows: int) -> None:
        self.fn, self.max_rows = fn, max_rows
        self._captures = _Captures(fn)

    @property
    def graphs(self) -> dict[tuple, _Graph]:
        return self._captures.graphs

    def __call__(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        n, length = input_ids.shape
        if n > self.max_rows:
            return self.fn(input_ids, sigma)
        key, inputs = (n, length, sigma is not None), (input_ids, sigma)
        if key not in self.graphs:
            self._captures.capture(key, inputs)
        return self._captures.replay(key, inputs).clone()

    def prepare(self, rows: int, length: int, with_sigma: bool, device: torch.device) -> None:
        """Capture the graphs of every call of 1..rows sequences of `length` tokens now (outside any timing)."""
        for n in range(1, min(rows, self.max_rows) + 1):
            if (n, length, with_sigma) not in self.graphs:
                self._captures.capture((n, length, with_sigma), _example(n, length, with_sigma, device))


def padded_width(width: int, length: int) -> int:
    """The width a partial step's columns are padded to: the next power of two, at least 2, at most the length L.

    At least 2: torch.compile specialises a size of 1, so with compiled steps (compile_latent) width 1 would be a
    compilation of its own, where 2 and up share one with a dynamic width."""
    return min(max(2, 1 << (width - 1).bit_length()), length)


class GraphedLatent:
    """The latent cache's network calls, fn = MDLMDenoiser.latent_hidden's signature, for n <= max_rows sequences:
    a partial step's columns padded to padded_width (the last column repeated: a column given twice computes the
    same values twice, so the cache and the real columns' outputs are unchanged) and, on a GPU, replayed from CUDA
    graphs. On a CPU the padded call runs directly (what the tests check). Calls of more sequences run fn as given.

    The graphs capture the cache by address: sample with the same cache tensor (PreparedDenoiser keeps one per
    batch shape) or each new cache is captured anew. `tables(length)` gives the tensors fn reads that the caller
    does not pass (the rotary tables), held so that their memory stays theirs while a graph can replay.
    """

    def __init__(self, fn: LatentFn, max_rows: int, tables: Callable[[int], Sequence[torch.Tensor]]) -> None:
        self.fn, self.max_rows, self.tables = fn, max_rows, tables
        # the held tensors come last in a capture's call: (input_ids, sigma, rows, positions, cache, *tables)
        self._captures = _Captures(lambda ids, sigma, rows, positions, cache, *_: fn(ids, sigma, cache, rows,
                                                                                      positions))

    @property
    def graphs(self) -> dict[tuple, _Graph]:
        return self._captures.graphs

    def __call__(self, input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor, rows: torch.Tensor,
                 positions: torch.Tensor | None) -> torch.Tensor:
        n, length = input_ids.shape
        if n > self.max_rows:
            return self.fn(input_ids, sigma, cache, rows, positions)
        width = positions.shape[1] if positions is not None else None
        if width is not None and width < (padded := padded_width(width, length)):
            positions = torch.cat((positions, positions[:, -1:].expand(n, padded - width)), dim=1)  # [n, A']
        if input_ids.device.type != "cuda":
            out = self.fn(input_ids, sigma, cache, rows, positions)
        else:
            key, inputs = self._key(n, length, sigma is not None, cache, positions), (input_ids, sigma, rows, positions)
            if key not in self.graphs:  # the tables are looked up only here: a replay needs nothing but the inputs
                self._captures.capture(key, inputs, (cache, *self.tables(length)))
            out = self._captures.replay(key, inputs)
        return (out if width is None else out[:, :width]).clone()  # [n, L or A, d]

    def prepare(self, rows: int, length: int, with_sigma: bool, cache: torch.Tensor) -> None:
        """Capture the graphs of every call of 1..rows sequences (a refresh, and a partial step at every padded
        width) over this cache now, outside any timing (no-op off a GPU)."""
        if cache.device.type != "cuda":
            return
        widths = sorted({padded_width(a, length) for a in range(1, length + 1)})
        held = (cache, *self.tables(length))
        for n in range(1, min(rows, self.max_rows) + 1):
            ids, sigma = _example(n, length, with_sigma, cache.device)
            rows_n = torch.arange(n, device=cache.device)
            for positions in (None, *(torch.zeros((n, a), dtype=torch.long, device=cache.device) for a in widths)):
                key = self._key(n, length, with_sigma, cache, positions)
                if key not in self.graphs:
                    self._captures.capture(key, (ids, sigma, rows_n, positions), held)

    @staticmethod
    def _key(n: int, length: int, with_sigma: bool, cache: torch.Tensor, positions: torch.Tensor | None) -> tuple:
        return (n, length, with_sigma, positions.shape[1] if positions is not None else None, cache.data_ptr())


def _example(n: int, length: int, with_sigma: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs of n sequences to capture a graph with: token ids [n, L] and sigma [n] (or None)."""
    return (torch.zeros((n, length), dtype=torch.long, device=device),
            torch.zeros(n, device=device) if with_sigma else None)
