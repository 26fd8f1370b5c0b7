"""CUDA-graph replay of a compression's small solves (`SolveGraphs`).

Nothing here changes a number: a replayed loop runs the same kernels with the same arguments on the same
values as a launched one. It only removes the host's cost of issuing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

GRAPH_MAX_WEIGHTS = 1 << 25  # SolveGraphs: the largest solves it captures (OPT-2.7B's fc2: 26 M weights)
GRAPH_MAX_COLUMNS = 16384  # ... and the widest: its copy of the factor U is columns^2 fp32 (1 GiB here)


@dataclass
class CapturedLoop:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # copied into before each replay
    outputs: tuple[torch.Tensor, ...]  # overwritten by each replay


class SolveGraphs:
    """A compression's block loops, captured as CUDA graphs and replayed.

    Why: below a few million weights a solve is bound by the host issuing its launches (about 35 per block),
    not by the GPU running them: at OPT-1.3B's shapes 12 ms of wall time for 5 ms of GPU work per 2048 x 2048
    Linear (`experiments/solve_overhead.py`). The Linears of one shape and settings recur in every layer, so
    the loop is captured the second time a key is seen and replayed from then on: the same kernels with the
    same arguments on the same values, so the same results. Each captured loop holds its inputs (W, the
    factor U, the grid), outputs and scratch until this object goes: the walk owns one per compression.
    Wider matrices keep the launch-by-launch loop, which their GPU time hides and whose factor would be
    held twice."""

    def __init__(self, max_weights: int = GRAPH_MAX_WEIGHTS, max_columns: int = GRAPH_MAX_COLUMNS) -> None:
        self.max_weights = max_weights
        self.max_columns = max_columns
        self._seen: set = set()
        self._captured: dict[tuple, CapturedLoop] = {}

    def covers(self, W: torch.Tensor) -> bool:
        return W.is_cuda and W.numel() <= self.max_weights and W.shape[1] <= self.max_columns

    @property
    def captured(self) -> int:
        return len(self._captured)

    def run(self, key: tuple, loop: Callable[..., tuple[torch.Tensor, ...]], *inputs: torch.Tensor
            ) -> tuple[torch.Tensor, ...]:
        """loop(*inputs), which may modify its inputs and must depend on nothing but them (their shapes, dtypes and
        values) and `key`: run as it is the first time it is seen, captured the second, replayed after that. If
        the device has no memory left to capture it, nothing is captured from then on (the loops are launched:
        the same results, slower)."""
        key = (key, *((x.shape, x.dtype, x.device) for x in inputs))
        entry = self._captured.get(key)
        if entry is None:
            if key not in self._seen:
                self._seen.add(key)
                return loop(*inputs)
            try:
                entry = self._capture(loop, tuple(x.clone() for x in inputs))
            except torch.cuda.OutOfMemoryError:
                self.max_weights = 0
                self._captured.clear()
                torch.cuda.empty_cache()
                return loop(*inputs)
            self._captured[key] = entry
        else:
            for held, x in zip(entry.inputs, inputs):
                held.copy_(x)
        entry.graph.replay()
        return tuple(x.clone() for x in entry.outputs)

    @staticmethod
    def _capture(loop: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]) -> CapturedLoop:
        """Capture loop(*inputs) on a side stream. Not `torch.cuda.graph`, which empties the allocator's caches
        (the device's and pinned host memory) before each capture; thread_local: a layer mover's thread may use
        the GPU meanwhile (its work is not captured)."""
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = loop(*inputs)
            except BaseException:
                try:
                    graph.capture_end()  # ends the (invalidated) capture; its own error would hide the cause
                except RuntimeError:
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        return CapturedLoop(graph, inputs, tuple(outputs))
