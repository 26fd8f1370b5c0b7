"""The sequential compression loop: each decoder layer calibrated on the outputs of the already-compressed layers
before it, its Linears solved, and its compressed outputs fed to the next layer.

The loop knows the model only through modelutils' walk and the family table; each Linear's solve, cost model
and allocation are model-agnostic (sparsegpt_enhanced, mixed/) and get the run's settings through one
`SolveSettings`. Timed stages (`Log.stage`: hessians, costs, clip, allocate, factor, solve) cost nothing unless
a benchmark's Log times them (bench.py --stages).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from families import decoder_of
from mixed import bitalloc, costs, row_ranges
from mixed.precision import MixedPrecision
from mixed.stats import LinearStats, code_bits, storage_bits
from modelutils import capture_layer_inputs, check_finite, decoder_layers, find_linears, linear_name, walk_layers
from pipeline.calibrate import collect_hessians, selected_names, solve_graphs
from pipeline.config import RunConfig
from pipeline.model_scope import BitPlan, allocation_scope, plan_model_bits
from quant import QuantGrid
from sparsegpt_enhanced import SparseGPT, magnitude_prune
from systems import distributed, offload
from systems.progress import Log, TimeLeft


@dataclass
class Compressed:
    """What compression produced besides the new weights: statistics and, per quantized Linear
    (by its name in the model), the grid ranges and bit map a packed export needs."""

    stats: list[LinearStats]
    grids: dict[str, QuantGrid]
    bits: dict[str, torch.Tensor]
    bit_scope: str | None = None  # the allocation scope a mixed run used (allocation_scope)
    mixed_precision: MixedPrecision | None = None  # the allocation's parameters as run (defaults resolved)


@torch.no_grad()
def compress(model: nn.Module, calibration: torch.Tensor, cfg: RunConfig, dev: torch.device, log: Log,
             moves: offload.MoveStats | None = None) -> Compressed:
    """The sequential loop: each layer is calibrated on the outputs of the already-compressed
    layers before it, compressed, and its compressed outputs feed the next layer.

    Under torchrun (systems/distributed.py) each rank runs its shard of the calibration windows through the
    layers, the Hessians are summed across ranks, each rank solves the Linears `distributed.assign`
    gives it, and the compressed weights and their records are shared before the layer's outputs
    are computed. `moves` collects what the layer mover did (bench.py's timeline)."""
    nlayers = len(decoder_layers(model))
    shared = decoder_of(model).shared_input
    out = Compressed([], {}, {})
    calibrated = not (cfg.gmp or cfg.nearest)
    calibration = distributed.shard(calibration)
    inputs = capture_layer_inputs(model, calibration, dev, cfg.batch_size) if calibrated else None
    graphs = solve_graphs(cfg, dev)
    plan = BitPlan()
    if cfg.mixed:
        out.bit_scope = allocation_scope(cfg, model, dev)
        log(f"bit allocation: {'one over the whole model' if out.bit_scope == 'model' else 'each Linear on target'}"
            f" (--bit_scope {cfg.bit_scope})")
        cfg = replace(cfg, bit_scope=out.bit_scope)  # the default widths depend on it (RunConfig.allowed_widths)
        out.mixed_precision = cfg.mixed_precision
        if out.bit_scope == "model":
            plan = plan_model_bits(model, calibration, inputs, cfg, dev, log, graphs)
    budget = bitalloc.StoredBits(cfg.mixed_precision.drift_correction if cfg.mixed else False)
    parallel, rank = distributed.size() > 1, distributed.rank()
    progress = lambda items: log.bar(items, nlayers, "compress layers")
    left = TimeLeft(nlayers, "compression")
    for i, layer in walk_layers(model, dev, inputs, progress, check=True, overlap=None if cfg.overlap else False,
                                moves=moves):
        tick = time.time()
        linears = find_linears(layer)
        chosen = selected_names(layer, i, cfg)
        solvers = {}
        if calibrated and chosen:
            with log.stage("hessians"):
                solvers = collect_hessians(layer, chosen, inputs, dev, shared, linear_name(model, i, ""), graphs)
        owners = distributed.assign(chosen, linears, shared) if parallel else {}
        solvers = {k: s for k, s in solvers.items() if owners.get(k, rank) == rank}
        solved: dict[str, tuple[LinearStats, QuantGrid | None, torch.Tensor | None, float]] = {}
        for n in chosen:
            if owners.get(n, rank) != rank:
                continue
            spend = budget.side_by_side(first=n == chosen[0]) if parallel else budget
            carried = spend.carried
            solved[n] = (*compress_linear(linear_name(model, i, n), linears[n], solvers.get(shared.get(n, n)), plan,
                                          spend, cfg, log), spend.carried - carried)
        if parallel:
            solved = distributed.share_linears(chosen, linears, owners, solved)
            budget.carried += sum(drift for *_, drift in solved.values())
        for n in chosen:
            stats, grid, bits, _ = solved[n]
            out.stats.append(stats)
            if grid is not None:
                out.grids[stats.name], out.bits[stats.name] = grid, bits
        del solvers  # this layer's Hessians and factors (~20 GB at OPT-175B width) go before the next layer's come
        log(f"layer {i + 1}/{nlayers} compressed in {time.time() - tick:.2f}s, {left.step()}")
    return out


def compress_linear(name: str, linear: nn.Linear, solver: SparseGPT | None, plan: BitPlan,
                    budget: bitalloc.StoredBits, cfg: RunConfig, log: Log
                    ) -> tuple[LinearStats, QuantGrid | None, torch.Tensor | None]:
    """One Linear: its widths (mixed runs: costed and allocated within its budget), its grid (range factors
    chosen where clipped), then the solve, or a baseline (magnitude pruning, round-to-nearest) without a solver."""
    tick = time.time()
    W = linear.weight.data
    check_finite(W, f"weight of {name}")
    rows, columns = W.shape
    settings = cfg.solve_settings
    bits = imp_range = planned = predicted = None
    shrink: dict[int, float] = {}
    if cfg.quantize:
        bits = torch.full((columns,), cfg.wbits, dtype=torch.int64)
    if cfg.mixed:
        with log.stage("costs"):
            mp = cfg.mixed_precision
            priced = costs.channel_costs(W, solver, settings, cfg.wbits, mp, plan.sensitivity.get(name),
                                         plan.range_factors(name, mp.clip_search))
        imp_range = (priced.importance.min().item(), priced.importance.max().item())
        shrink = priced.shrink
        with log.stage("allocate"):
            if name in plan.widths:
                bits = torch.full((columns,), plan.widths[name], dtype=torch.int64)
            else:
                kept = priced.size.sum().item()
                planned = plan.budgets.get(name, cfg.target_avg_bits * kept)
                bits = bitalloc.allocate(priced, cfg.mixed_precision, budget.linear_target(planned, kept))
        predicted = code_bits(priced.size.round().long(), bits)  # what the allocator expects to store
    elif cfg.quantize and cfg.clipped and solver is not None:
        with log.stage("clip"):
            shrink = costs.range_factors(W, solver, settings, [cfg.wbits], cfg.uniform_clip_search)
    error, damping = 0.0, cfg.percdamp
    grid = QuantGrid.for_weight(W.float(), cfg.sym, cfg.groupsize, shrink) if cfg.quantize else None
    if solver is None:  # the baselines: magnitude pruning and/or round-to-nearest
        Q = magnitude_prune(W.float(), cfg.prune) if cfg.gmp else W.float()
        mask = (Q == 0) if cfg.gmp else torch.zeros_like(Q, dtype=torch.bool)
        if cfg.nearest:
            grid = QuantGrid.rounding(Q, cfg.sym, cfg.groupsize)
            Q = grid.round(Q, bits)
    else:
        order = solver.column_order(settings, bits)
        with log.stage("factor"):
            damping = solver.inverse_factor(cfg.percdamp, order).percdamp  # cached: the solve reuses it
        if cfg.row_ranges == "search":
            with log.stage("row ranges"):
                grid = row_ranges.search_row_ranges(W, solver, settings, bits, order, shrink)
        with log.stage("solve"):
            result = solver.fasterprune(W, settings, grid, bits, order)
        Q, mask, error = result.weight, result.mask, result.error
    linear.weight.data = Q.to(W.dtype)
    kept = (~mask).sum(0) if cfg.prune.active else torch.full((columns,), rows)
    codes = 0 if bits is None else code_bits(kept, bits)
    if planned is not None:
        budget.spent(planned, codes)
    groups = grid.xmin.shape[1] if grid is not None else 1
    # The packed form stores a code for each nonzero weight of a pruned matrix (a kept weight that rounded to zero
    # needs none), so its size counts those; the bit target counts every kept weight.
    packed = (linear.weight.data != 0).sum(0) if cfg.prune.active else kept
    stats = LinearStats(
        name=name, rows=rows, columns=columns, groups=groups, nonzero=int((linear.weight.data != 0).sum()),
        kept=int(kept.sum()), pruned=cfg.prune.active, bits_per_column=None if bits is None else bits.tolist(),
        code_bits=codes, predicted_code_bits=predicted, importance_range=imp_range, error=error, damping=damping,
        seconds=time.time() - tick,
        storage_bits=storage_bits(rows, packed, bits, groups, cfg.prune.active, len(cfg.allowed_widths), len(shrink)),
    )
    return stats, grid, bits
