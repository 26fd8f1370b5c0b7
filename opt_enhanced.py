"""Compress an OPT model one decoder layer at a time and report perplexity.

    python opt_enhanced.py MODEL DATASET [flags]

MODEL is a hub id (facebook/opt-125m) or a local directory; DATASET (wikitext2, ptb, c4) is the
calibration set. Flags and defaults follow IST-DASLab's sparsegpt/gptq `opt.py`; the same flags
give the same perplexities. Perplexity is then measured on WikiText-2, PTB and C4.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Iterator, NoReturn

import torch
import torch.nn as nn

import datautils
import bitalloc
import distributed
from bitalloc import MixedPrecision
from compression_stats import LinearStats, code_bits, format_summary, plot_bits, storage_bits, summarize
import compressed_tensors_export
import lm_eval_tasks
import offload
import row_ranges
import streaming
from compressed_tensors_export import export_compressed_tensors
from export import export_compressed
from modelutils import (capture_layer_inputs, check_finite, check_weights_finite, decoder_io_modules, decoder_layers,
                        decoder_of, feed_inputs, find_linears, head_modules, import_transformers, layer_output,
                        layer_store, linear_name, load_config, load_opt, logits_from_hidden, model_source, resident,
                        walk_layers)
from quant import QuantGrid
from runtime import (Background, Interrupted, Log, Stages, atomic_directory, current_stage, nonfinite_path,
                     process_seconds, quiet_libraries, set_stage, sigterm_interrupts, write_json)
from sparsegpt_enhanced import SOLVE_ORDERS, PruneSpec, SolveGraphs, SparseGPT, magnitude_prune, solve_order

EVAL_DATASETS = ("wikitext2", "ptb", "c4")
# The values each enumerated setting takes: the flags' choices, and what validate() holds a RunConfig to.
CHOICES = {
    "bit_method": ("quantile", "budget"),
    "bit_scope": ("auto", "layer", "model"),
    "bit_granularity": ("channel", "linear"),
    "clip": ("auto", "none", "width"),
    "clip_objective": ("solver", "uncompensated", "solve"),
    "row_ranges": ("dense", "search"),
    "shrinkage_mean": ("per_channel", "per_weight"),
    "channel_cost": ("weighted", "error"),
    "solve_order": ("auto", *SOLVE_ORDERS),
}


@dataclass
class RunConfig:
    """Every setting of a run (the CLI flags), saved with its results."""

    model: str
    dataset: str
    seed: int = 0
    nsamples: int = 128
    percdamp: float = 0.01
    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    blocksize: int = 128
    gmp: bool = False
    wbits: int = 16
    minlayer: int = -1
    maxlayer: int = 1000
    prune_only: str = ""
    invert: bool = False
    solve_order: str = "auto"  # auto: by the run (solve_order_as_run)
    save: str = ""
    export: str = ""
    export_format: str = "packed"
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str = ""
    groupsize: int = -1
    sym: bool = False
    nearest: bool = False
    seqlen: int = 0
    data_dir: str | None = None
    cache_dir: str | None = None
    results_json: str = ""
    plot: str = ""
    target_avg_bits: float | None = None
    bit_method: str = "quantile"
    bit_scope: str = "auto"  # auto: model when the whole model is on the device, else layer (allocation_scope)
    bit_granularity: str = "channel"
    clip: str = "auto"
    clip_objective: str = MixedPrecision.clip_objective
    clip_min: float = bitalloc.CLIP_MIN
    row_ranges: str = "dense"
    error_shrinkage: float | None = None  # None: the method's (bitalloc.ERROR_SHRINKAGE)
    sensitivity_shrinkage: float = MixedPrecision.sensitivity_shrinkage
    shrinkage_mean: str = MixedPrecision.shrinkage_mean
    channel_cost: str = MixedPrecision.channel_cost
    bit_options: list[int] | None = None  # None: the allocator's (allowed_widths)
    importance_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    eval: list[str] = field(default_factory=lambda: list(EVAL_DATASETS))
    batch_size: int = 8
    device: str = ""
    gpus: int = 0  # processes, one GPU each (0: as launched, one without torchrun)
    offload: bool = False
    stream: bool = False
    overlap: bool = True  # offloaded layers move behind the computation (offload.py); False: in line
    no_fused: bool = False
    quiet: bool = False

    @property
    def prune(self) -> PruneSpec:
        return PruneSpec(self.sparsity, self.prunen, self.prunem)

    @property
    def quantize(self) -> bool:
        return self.wbits < 16

    @property
    def mixed(self) -> bool:
        return self.target_avg_bits is not None

    @property
    def solve_order_as_run(self) -> str:
        """The order the solver takes a Linear's columns in (sparsegpt_enhanced.solve_order): as asked, else act
        order in mixed runs without sparsity or groups and the stored order otherwise (the reference's). With
        sparsity act order moves the masks, and narrow widths first within each mask block lowers the layer
        error yet loses on validation text (BENCHMARKS.md §3)."""
        if self.solve_order != "auto":
            return self.solve_order
        mixed_dense = self.mixed and not self.prune.active and self.groupsize <= 0 and not (self.gmp or self.nearest)
        return "act" if mixed_dense else "stored"

    @property
    def order_unit(self) -> int:
        """The columns `narrow_first` reorders within: an N:M group, else a block (the unstructured mask's)."""
        return self.prunem if self.prunen else self.blocksize

    @property
    def clipped(self) -> bool:
        """Whether widths get a shrunk range: asked for, or by default in mixed runs."""
        return self.clip == "width" or (self.clip == "auto" and self.mixed)

    @property
    def allowed_widths(self) -> list[int]:
        """--bit_options, else the widths the allocator chooses from by default (bitalloc.default_options)."""
        if self.bit_options is not None:
            return list(self.bit_options)
        if not self.mixed:
            return list(bitalloc.BIT_OPTIONS)
        return list(bitalloc.default_options(self.bit_method, self.bit_granularity, self.bit_scope,
                                             self.target_avg_bits, self.prune.active, self.wbits))

    @property
    def mixed_precision(self) -> MixedPrecision:
        return MixedPrecision(self.target_avg_bits, tuple(self.allowed_widths), self.bit_method,
                              self.bit_granularity, tuple(self.importance_weights), self.error_shrinkage,
                              clip=self.clipped, clip_factors=bitalloc.clip_factors(self.clip_min),
                              clip_objective=self.clip_objective,
                              sensitivity_shrinkage=self.sensitivity_shrinkage, shrinkage_mean=self.shrinkage_mean,
                              channel_cost=self.channel_cost)

    def selected(self, layer: int, name: str) -> bool:
        """The reference's --minlayer/--maxlayer/--prune_only/--invert filter."""
        inside = self.minlayer <= layer < self.maxlayer and self.prune_only in name
        return inside != self.invert


# ---------------------------------------------------------------- loading


def place(model: nn.Module, dev: torch.device, offload: bool = False) -> None:
    """Keep the whole model on the GPU when it fits easily; otherwise (or when asked) only the
    layer at hand: the decoder layers stay on the CPU and visit the GPU one at a time. "Fits" counts
    the memory the model already holds there as free (bench.py --synthetic builds it on the GPU).
    A streamed model's layers are read when needed (streaming.py): only the rest goes to `dev`."""
    if layer_store(model) is not None:
        for m in decoder_io_modules(model):
            m.to(dev)
        return
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    there = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == dev.type)
    if dev.type == "cuda" and size > 0.4 * (torch.cuda.mem_get_info(dev)[0] + there):
        offload = True
    if offload and dev.type == "cuda":
        decoder_layers(model).to("cpu")
        for m in decoder_io_modules(model):
            m.to(dev)
    else:
        model.to(dev)


def use_device(dev: torch.device) -> None:
    """Make a numbered GPU (cuda:LOCAL_RANK under torchrun) the calling thread's current device: Triton
    launches its kernels there whatever device the tensors are on, and a tensor made on plain "cuda"
    lands there (on GPU 0 it would cost every process a CUDA context on GPU 0)."""
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def load_and_place(cfg: RunConfig, dev: torch.device) -> nn.Module:
    """Load the model, place it (`place`) and scan its weights for NaN/Inf where they were placed."""
    use_device(dev)  # this runs on a thread of its own
    if cfg.stream:  # the compressed layers wait beside the --save target, so that saving only links them
        model = streaming.load_streamed(cfg.model, os.path.dirname(os.path.abspath(cfg.save)) if cfg.save else None)
    else:
        model = load_opt(cfg.model, cfg.quiet, check_values=False)
    place(model, dev, cfg.offload)
    if not cfg.stream:  # (load_streamed checked the tensors outside the layers; the layers are read later)
        check_weights_finite(cfg.model, model.state_dict())  # where they were placed: on the GPU, a quick pass
    return model


WARM_UP_COLUMNS = 1024


def warm_up_device(cfg: RunConfig, dev: torch.device) -> None:
    """Run the solver once on a small random matrix with the run's settings, so that CUDA, cuBLAS/cuSOLVER and
    the Triton kernel have started before the first real layer needs them: 1-2 s, and 2 s more on the H200 when
    the kernel compiles (its first use on a machine). Triton compiles one kernel per set of constexprs, which
    shapes decide only through the block width and strides that are multiples of 16 or not (kernels.variant):
    a matrix of WARM_UP_COLUMNS columns compiles what the model's Linears use."""
    use_device(dev)
    columns = max(WARM_UP_COLUMNS, cfg.blocksize)
    x = torch.randn(4 * columns, columns, generator=torch.Generator().manual_seed(0)).to(dev, torch.float16)
    weight = torch.randn(columns, columns, generator=torch.Generator().manual_seed(1)).to(dev)
    solver = SparseGPT(columns, dev)
    solver.add_batch(x)
    grid = QuantGrid.for_weight(weight, cfg.sym, cfg.groupsize) if cfg.quantize else None
    bits = torch.full((columns,), cfg.wbits, dtype=torch.int64) if cfg.quantize else None
    solver.fasterprune(weight, cfg.prune, grid, bits, cfg.blocksize, cfg.percdamp, None, not cfg.no_fused)
    torch.cuda.synchronize(dev)


@contextmanager
def device_starting(cfg: RunConfig) -> Iterator[None]:
    """Warm the run's GPU up (`warm_up_device`) on a thread while the block runs, and wait for it at the end.
    The block must not build a model: transformers sets torch's default dtype process-wide while it does, and
    the solver makes some of its tensors in the default dtype. CPU runs, and runs without calibrated
    compression, have nothing to start."""
    dev = run_device(cfg)
    if dev.type != "cuda" or cfg.gmp or cfg.nearest or not (cfg.prune.active or cfg.quantize):
        yield
        return
    warming = Background(lambda: warm_up_device(cfg, dev))
    try:
        yield
    finally:
        warming.join()
    warming.result()


def tokenize(cfg: RunConfig, stage: Stages) -> tuple[Any, int, torch.Tensor, dict[str, torch.Tensor]]:
    """(tokenizer, seqlen, calibration windows, evaluation ids by dataset)."""
    with stage("tokenize", gpu=False):
        positions = load_config(cfg.model).max_position_embeddings  # the config alone, no weights
        seqlen = cfg.seqlen or positions
        if seqlen > positions:
            raise UsageError(f"--seqlen {seqlen} exceeds the model's {positions} positions")
        tokenizer = datautils.get_tokenizer(cfg.model)
        calibration = datautils.get_calibration(cfg.dataset, tokenizer, cfg.nsamples, cfg.seed, seqlen,
                                                cfg.data_dir, cfg.cache_dir)
        eval_ids = {d: datautils.get_eval_ids(d, tokenizer, seqlen, cfg.data_dir, cfg.cache_dir) for d in cfg.eval}
    return tokenizer, seqlen, calibration, eval_ids


# ---------------------------------------------------------------- compression


def solve_graphs(cfg: RunConfig, dev: torch.device) -> SolveGraphs | None:
    """Where a compression's small solves are captured and replayed (`SolveGraphs`): CUDA with the fused kernel;
    --no_fused keeps the reference loop, launch by launch."""
    return SolveGraphs() if dev.type == "cuda" and not cfg.no_fused else None


def collect_hessians(layer: nn.Module, names: list[str], hidden: torch.Tensor, kwargs: dict, cfg: RunConfig,
                     dev: torch.device, shared: dict[str, str], prefix: str = "",
                     graphs: SolveGraphs | None = None) -> dict[str, SparseGPT]:
    """The SparseGPT (Hessian) of each of `names`, filled by a forward pass: one per distinct input, so
    Linears that read the same activations (`shared`: q/k/v, gate/up) share one. `prefix` + name names
    each in messages (`model.decoder.layers.3.`); `graphs`: where their small solves are replayed."""
    linears = find_linears(layer)
    keys = sorted({shared.get(n, n) for n in names})
    solvers = {k: SparseGPT(linears[k].in_features, dev, name=prefix + k, graphs=graphs) for k in keys}
    feed_inputs(layer, {k: linears[k] for k in keys}, lambda k, x: solvers[k].add_batch(x), hidden, kwargs,
                cfg.batch_size)
    distributed.reduce_hessians(solvers)  # under torchrun `hidden` is this rank's shard of the windows
    return solvers


def column_order(solver: SparseGPT, cfg: RunConfig, bits: torch.Tensor | None = None) -> torch.Tensor | None:
    """The run's solve order for one Linear (None: as stored); `bits`: its widths, where they are known."""
    return solve_order(solver.xtx.diagonal(), cfg.solve_order_as_run, bits, cfg.order_unit)


def channel_costs(weight: torch.Tensor, solver: SparseGPT, cfg: RunConfig,
                  row_weight: torch.Tensor | None = None) -> bitalloc.ChannelCosts:
    """The mixed-precision costs of one Linear's channels, with the run's solve settings."""
    order = column_order(solver, cfg)
    return bitalloc.channel_costs(weight, solver, cfg.prune, cfg.wbits, cfg.sym, cfg.groupsize, cfg.blocksize,
                                  cfg.percdamp, order, cfg.mixed_precision, row_weight, not cfg.no_fused)


def selected_names(layer: nn.Module, i: int, cfg: RunConfig) -> list[str]:
    return [n for n in find_linears(layer) if cfg.selected(i, n)]


def output_sensitivity(model: nn.Module, calibration: torch.Tensor, hidden: torch.Tensor, kwargs: dict,
                       dev: torch.device, batch_size: int) -> dict[str, torch.Tensor]:
    """Mean over the calibration tokens of (dLoss/dy_i)^2 for every output y_i of every decoder Linear:
    the diagonal Fisher of the dense model's next-token loss. An output error e_i costs the loss about
    F_i e_i^2 / 2, so it puts the Hessian-weighted errors of different Linears in one unit.

    `hidden`: the inputs of decoder layer 0 (capture_layer_inputs). The backward pass goes a layer at a
    time (backward_layer_by_layer), so the GPU holds one layer's activations rather than the whole
    model's (OPT-6.7B ran out of 80 GB otherwise), in fp32 (fp16 -> fp32 -> fp16 is exact) with TF32
    matmuls. Each layer is visited twice per batch, so the layers must stay on the GPU: not with --offload."""
    layers = decoder_layers(model)
    if not resident(layers, dev):
        raise RuntimeError("--bit_scope model needs the whole model on the run's device (its loss gradients visit "
                           "every layer twice per batch); drop --offload or use --bit_scope layer")
    kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, grad: torch.Tensor) -> None:
        g = grad.reshape(-1, grad.shape[-1]).float()
        sums[name] = sums.get(name, 0) + (g ** 2).sum(0)

    handles = [linear.register_full_backward_hook(lambda m, gin, gout, name=linear_name(model, i, n):
                                                  accumulate(name, gout[0]))
               for i, layer in enumerate(layers) for n, linear in find_linears(layer).items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients for the activations only
        p.requires_grad_(False)
    tokens = 0
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls: several times faster, ample for a mean of squares
    try:
        for start in range(0, len(calibration), batch_size):
            ids = calibration[start:start + batch_size].to(dev)
            backward_layer_by_layer(model, hidden[start:start + batch_size], kwargs, ids)
            tokens += ids[:, 1:].numel()
    finally:
        torch.set_float32_matmul_precision(precision)
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    for name in sorted(sums):  # under torchrun each rank saw its shard of the windows
        distributed.total(sums[name])
    tokens = int(distributed.total(torch.tensor(tokens, device=dev)).item())
    return {name: s / tokens for name, s in sums.items()}


def backward_layer_by_layer(model: nn.Module, hidden: torch.Tensor, kwargs: dict, ids: torch.Tensor) -> None:
    """Backpropagate the summed next-token loss of `ids` (decoder-layer-0 inputs `hidden`) through the
    decoder in fp32, one layer at a time: the forward keeps each layer's input, the backward runs the
    layer again with gradients. Backward hooks see every Linear's output gradient."""
    layers = decoder_layers(model)
    x, inputs = hidden.float().detach(), []
    for layer in layers:
        inputs.append(x)
        with torch.no_grad(), in_fp32(layer):
            x = layer_output(layer(x, **kwargs))
    with torch.enable_grad(), in_fp32(*head_modules(model)):
        x.requires_grad_()
        logits = logits_from_hidden(model, x)[:, :-1]
        nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    grad = x.grad
    for layer, x in zip(reversed(layers), reversed(inputs)):
        with torch.enable_grad(), in_fp32(layer):
            x.requires_grad_()
            layer_output(layer(x, **kwargs)).backward(grad)
        grad = x.grad


@contextmanager
def in_fp32(*modules: nn.Module):
    """Run the modules in fp32 for a while; fp16 -> fp32 -> fp16 gives back the same weights."""
    dtype = next(modules[0].parameters()).dtype
    for m in modules:
        m.float()
    try:
        yield
    finally:
        for m in modules:
            m.to(dtype)


@dataclass
class BitPlan:
    """What an allocation across the model fixed before compression: each Linear's share of the
    stored-bit budget (channel granularity) or its one width (linear granularity)."""

    budgets: dict[str, float] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)


def plan_model_bits(model: nn.Module, calibration: torch.Tensor, hidden: torch.Tensor, kwargs: dict, cfg: RunConfig,
                    dev: torch.device, log: Log, graphs: SolveGraphs | None = None) -> BitPlan:
    """--bit_scope model: cost every channel on the dense model (`hidden`: the inputs of its first
    layer, left as they are), errors in units of loss, then one allocation for all."""
    shared = decoder_of(model).shared_input
    nlayers = len(decoder_layers(model))
    sensitivity = output_sensitivity(model, calibration, hidden, kwargs, dev, cfg.batch_size)
    log("measured the loss's sensitivity to every Linear output")
    hidden = hidden.clone()
    costs: dict[str, bitalloc.ChannelCosts] = {}
    tied: list[list[str]] = []
    for i, layer in walk_layers(model, dev, hidden, kwargs, cfg.batch_size):
        linears = find_linears(layer)
        chosen = selected_names(layer, i, cfg)
        solvers = collect_hessians(layer, chosen, hidden, kwargs, cfg, dev, shared, linear_name(model, i, ""), graphs)
        groups: dict[str, list[str]] = {}
        for n in chosen:
            name = linear_name(model, i, n)
            costs[name] = channel_costs(linears[n].weight.data, solvers[shared.get(n, n)], cfg, sensitivity[name])
            groups.setdefault(shared.get(n, n), []).append(name)  # q/k/v (and gate/up): one width
        tied += groups.values()
        del solvers  # as in compress: not alive while the next layer's are built
        log(f"costed layer {i + 1}/{nlayers}")
    mp = cfg.mixed_precision
    if mp.granularity == "linear":
        return BitPlan(widths=bitalloc.plan_linear_widths(costs, tied, mp))
    return BitPlan(budgets=bitalloc.plan_budgets(costs, mp), sensitivity=sensitivity)


def allocation_scope(cfg: RunConfig, model: nn.Module, dev: torch.device) -> str:
    """--bit_scope as run. auto is model, one allocation over every channel with errors in units of the loss,
    which won on validation text (BENCHMARKS.md §3), when every decoder layer is on the device: the loss
    gradients it needs visit each layer twice per batch. An offloaded or streamed model gets layer scope
    (each Linear meets the target); one width per Linear always needs model scope."""
    if cfg.bit_scope != "auto":
        return cfg.bit_scope
    if cfg.bit_granularity == "linear" or resident(decoder_layers(model), dev):
        return "model"
    return "layer"


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

    Under torchrun (distributed.py) each rank runs its shard of the calibration windows through the
    layers, the Hessians are summed across ranks, each rank solves the Linears `distributed.assign`
    gives it, and the compressed weights and their records are shared before the layer's outputs
    are computed. `moves` collects what the layer mover did (bench.py's timeline)."""
    nlayers = len(decoder_layers(model))
    shared = decoder_of(model).shared_input
    out = Compressed([], {}, {})
    calibrated = not (cfg.gmp or cfg.nearest)
    calibration = distributed.shard(calibration)
    hidden = kwargs = None
    if calibrated:
        hidden, kwargs = capture_layer_inputs(model, calibration, dev, cfg.batch_size)
    graphs = solve_graphs(cfg, dev)
    plan = BitPlan()
    if cfg.mixed:
        out.bit_scope = allocation_scope(cfg, model, dev)
        log(f"bit allocation: {'one over the whole model' if out.bit_scope == 'model' else 'each Linear on target'}"
            f" (--bit_scope {cfg.bit_scope})")
        cfg = replace(cfg, bit_scope=out.bit_scope)  # the default widths depend on it (RunConfig.allowed_widths)
        out.mixed_precision = cfg.mixed_precision
        if out.bit_scope == "model":
            plan = plan_model_bits(model, calibration, hidden, kwargs, cfg, dev, log, graphs)
    budget = bitalloc.StoredBits(cfg.mixed_precision.drift_correction if cfg.mixed else False)
    parallel, rank = distributed.size() > 1, distributed.rank()
    progress = lambda items: log.bar(items, nlayers, "compress layers")
    for i, layer in walk_layers(model, dev, hidden, kwargs, cfg.batch_size, progress, check=True,
                                overlap=None if cfg.overlap else False, moves=moves):
        tick = time.time()
        linears = find_linears(layer)
        chosen = selected_names(layer, i, cfg)
        solvers = collect_hessians(layer, chosen, hidden, kwargs, cfg, dev, shared, linear_name(model, i, ""),
                                   graphs) if calibrated and chosen else {}
        owners = distributed.assign(chosen, linears, shared) if parallel else {}
        solvers = {k: s for k, s in solvers.items() if owners.get(k, rank) == rank}
        solved: dict[str, tuple[LinearStats, QuantGrid | None, torch.Tensor | None, float]] = {}
        for n in chosen:
            if owners.get(n, rank) != rank:
                continue
            spend = budget.side_by_side(first=n == chosen[0]) if parallel else budget
            carried = spend.carried
            solved[n] = (*compress_linear(linear_name(model, i, n), linears[n], solvers.get(shared.get(n, n)), plan,
                                          spend, cfg), spend.carried - carried)
        if parallel:
            solved = distributed.share_linears(chosen, linears, owners, solved)
            budget.carried += sum(drift for *_, drift in solved.values())
        for n in chosen:
            stats, grid, bits, _ = solved[n]
            out.stats.append(stats)
            if grid is not None:
                out.grids[stats.name], out.bits[stats.name] = grid, bits
        del solvers  # this layer's Hessians and factors (~20 GB at OPT-175B width) go before the next layer's come
        log(f"layer {i + 1}/{nlayers} compressed in {time.time() - tick:.2f}s")
    return out


def compress_linear(name: str, linear: nn.Linear, solver: SparseGPT | None, plan: BitPlan,
                    budget: bitalloc.StoredBits, cfg: RunConfig) -> tuple[LinearStats, QuantGrid | None, torch.Tensor | None]:
    tick = time.time()
    W = linear.weight.data
    check_finite(W, f"weight of {name}")
    rows, columns = W.shape
    bits = imp_range = planned = predicted = None
    shrink: dict[int, float] = {}
    if cfg.quantize:
        bits = torch.full((columns,), cfg.wbits, dtype=torch.int64)
    if cfg.mixed:
        costs = channel_costs(W, solver, cfg, plan.sensitivity.get(name))
        imp_range = (costs.importance.min().item(), costs.importance.max().item())
        shrink = costs.shrink
        if name in plan.widths:
            bits = torch.full((columns,), plan.widths[name], dtype=torch.int64)
        else:
            kept = costs.size.sum().item()
            planned = plan.budgets.get(name, cfg.target_avg_bits * kept)
            bits = bitalloc.allocate(costs, cfg.mixed_precision, budget.linear_target(planned, kept))
        predicted = code_bits(costs.size.round().long(), bits)  # what the allocator expects to store
    elif cfg.quantize and cfg.clipped and solver is not None:
        shrink = bitalloc.range_factors(W, solver, cfg.prune, [cfg.wbits], bitalloc.clip_factors(cfg.clip_min),
                                        cfg.clip_objective, cfg.sym, cfg.groupsize, cfg.blocksize, cfg.percdamp,
                                        column_order(solver, cfg),
                                        fused=not cfg.no_fused)
    error, damping = 0.0, cfg.percdamp
    grid = QuantGrid.for_weight(W.float(), cfg.sym, cfg.groupsize, shrink) if cfg.quantize else None
    if solver is None:  # the baselines: magnitude pruning and/or round-to-nearest
        Q = magnitude_prune(W.float(), cfg.prune) if cfg.gmp else W.float()
        mask = (Q == 0) if cfg.gmp else torch.zeros_like(Q, dtype=torch.bool)
        if cfg.nearest:
            grid = QuantGrid.rounding(Q, cfg.sym, cfg.groupsize)
            Q = grid.round(Q, bits)
    else:
        order = column_order(solver, cfg, bits)
        if cfg.row_ranges == "search":
            grid = row_ranges.search_row_ranges(W, solver, cfg.prune, bits, cfg.sym, cfg.blocksize, cfg.percdamp,
                                                order, shrink, not cfg.no_fused)
        result = solver.fasterprune(W, cfg.prune, grid, bits, cfg.blocksize, cfg.percdamp, order, not cfg.no_fused)
        Q, mask, error, damping = result.weight, result.mask, result.error, solver.inverse_factor(cfg.percdamp, order).percdamp
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
        code_bits=codes, predicted_code_bits=predicted, importance_range=imp_range, error=error, damping=damping, seconds=time.time() - tick,
        storage_bits=storage_bits(rows, packed, bits, groups, cfg.prune.active, len(cfg.allowed_widths), len(shrink)),
    )
    return stats, grid, bits


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, dev: torch.device, batch_size: int,
               whole_model: bool | None = None, log: Log = Log(True), overlap: bool = True) -> float:
    """The SparseGPT protocol: non-overlapping seqlen windows, mean token NLL per window, exp of the mean.

    Whole-model batched forwards when the model sits on the device (the default there), else
    layer by layer over all windows, for models that only visit the GPU one layer at a time.
    Under torchrun each rank takes its shard of the windows and the NLL sums are added. `overlap` False moves
    offloaded layers in line (--no-overlap)."""
    nwin = ids.numel() // seqlen
    windows = distributed.shard(ids[0, : nwin * seqlen].view(nwin, seqlen))
    mine = len(windows)
    layers = decoder_layers(model)
    if whole_model is None:
        whole_model = resident(layers, dev)
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    if whole_model:
        for start in log.bar(range(0, mine, batch_size), -(-mine // batch_size), f"evaluate {nwin} windows"):
            batch = windows[start:start + batch_size].to(dev)
            nll += window_nll(model(batch, use_cache=False).logits, batch)
        return math.exp(distributed.total(nll).item() / nwin)
    hidden, kwargs = capture_layer_inputs(model, windows, dev, batch_size)
    progress = lambda items: log.bar(items, len(layers), f"evaluate {nwin} windows, layer by layer")
    for _ in walk_layers(model, dev, hidden, kwargs, batch_size, progress, overlap=None if overlap else False):
        pass  # the walk itself runs each layer over the windows
    for start in range(0, mine, batch_size):
        logits = logits_from_hidden(model, hidden[start:start + batch_size])
        nll += window_nll(logits, windows[start:start + batch_size].to(dev))
    return math.exp(distributed.total(nll).item() / nwin)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over windows of each window's mean next-token NLL (fp32 softmax)."""
    logits = logits[:, :-1].float()
    labels = ids[:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return loss.view(labels.shape).mean(1).double().sum()


# ---------------------------------------------------------------- the run


def run_device(cfg: RunConfig) -> torch.device:
    """Where layers are processed: --device, else CUDA if present; under torchrun each process's own GPU."""
    return distributed.local_device(torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))


def device_memory(dev: torch.device) -> int:
    """Bytes of memory the device has in all (the GPU's, or the machine's for the CPU)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(cfg: RunConfig, startup: float | None = None) -> dict[str, Any]:
    """One run: load, compress, evaluate, write the outputs. Under torchrun every rank runs it (inside
    `distributed.session`); only rank 0 logs, runs --lm_eval and writes outputs, and the others return
    their perplexities and timings alone. `startup`: the seconds the process took to get here (main() gives
    them; its timings then hold them, apart from `total`)."""
    log = Log(cfg.quiet or not distributed.is_main())
    dev = run_device(cfg)
    use_device(dev)
    # fp32 matmuls in full precision, as the published scripts set them (a run, not an import, decides this)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(cfg.seed)
    stage = Stages(dev)
    started = time.time()

    # A missing file fails at once; then the model loads on a thread while the data is tokenized (main() has
    # started the GPU: device_starting).
    datautils.check_sources(cfg.dataset, cfg.eval, cfg.data_dir)
    import_transformers()  # before the thread: two threads importing it at once can each find it half-initialised
    loading = Background(lambda: load_and_place(cfg, dev))
    try:
        tokenizer, seqlen, calibration, eval_ids = tokenize(cfg, stage)
    except BaseException:
        loading.join()  # from_pretrained patches torch process-wide while it runs: never leave it running behind
        raise
    with stage("load"):  # what is left of the load after tokenizing
        model = loading.result()
    log(f"model {cfg.model}: {model.config.num_hidden_layers} layers, seqlen {seqlen}; device {dev}")

    done = Compressed([], {}, {})
    with stage("compress"):
        if cfg.prune.active or cfg.quantize:
            with streaming.writing(model):  # a streamed model keeps its compressed layers (in files)
                done = compress(model, calibration, cfg, dev, log)
    stats = done.stats
    widths = list(done.mixed_precision.options) if done.mixed_precision else cfg.allowed_widths

    ppl: dict[str, float] = {}
    with stage("evaluate"):
        for d, ids in eval_ids.items():
            ppl[d] = perplexity(model, ids, seqlen, dev, cfg.batch_size, log=log, overlap=cfg.overlap)
            log(f"{d} perplexity: {ppl[d]:.3f}")
    if not distributed.is_main():  # no collective follows: rank 0 alone reports and writes
        return {"perplexity": ppl, "timings": dict(stage.seconds, total=time.time() - started)}
    scores = {}
    if cfg.lm_eval:
        with stage("lm_eval"):
            scores = lm_eval_tasks.evaluate(model.to(dev), tokenizer, cfg.lm_eval, cfg.lm_eval_include or None,
                                            cfg.batch_size, str(dev), cfg.data_dir, cfg.quiet)
        log(f"lm-eval: {json.dumps(scores)}")
    timings = dict(stage.seconds, total=time.time() - started)
    if startup is not None:
        timings["startup"] = startup

    summary = None
    if cfg.quantize:
        summary = summarize(stats)
        if summary.channels == 0:
            raise RuntimeError("quantization was requested but no channel was quantized (check --minlayer/--maxlayer/--prune_only)")
        log(format_summary(summary, stats))
    check_results(cfg, ppl, summary, stats)
    set_stage("writing the outputs")
    results = {
        "config": asdict(cfg),
        "perplexity": ppl,
        "timings": timings,
        "peak_gpu_gib": stage.peak_gib,
        "summary": None if summary is None else asdict(summary),
        "bit_scope": done.bit_scope,
        "solve_order": cfg.solve_order_as_run,  # auto resolved
        "mixed_precision": asdict(done.mixed_precision) if done.mixed_precision else None,  # as run: defaults resolved
        "layers": [asdict(s) for s in stats],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "processes": distributed.size(),
    }
    if scores:
        results["lm_eval"] = scores
    if cfg.save:
        save_model(model, tokenizer, results, cfg.save)
    if cfg.export and cfg.export_format == "compressed-tensors":
        report = export_compressed_tensors(model.to("cpu"), done.grids, done.bits, cfg.export, tokenizer,
                                           extra=results)
        results["export"] = asdict(report)
        log(report.summary())
    elif cfg.export:
        report = export_compressed(model.to("cpu"), done.grids, done.bits, cfg.export, cfg.prune.active,
                                   len(widths), extra=results, tokenizer=tokenizer)
        results["export"] = asdict(report)
        log(report.summary())
    if cfg.plot:
        plot_bits(stats, cfg.plot, widths)
    if cfg.results_json:
        write_json(results, cfg.results_json)
    return results


# A mixed run's stored average may miss its target by this much before the run counts as failed (the
# allocators keep it within 0.01 on the whole model; NaN importances once put every channel at the lowest width).
TARGET_TOLERANCE = 0.05


def check_results(cfg: RunConfig, ppl: dict[str, float], summary, stats: list[LinearStats]) -> None:
    """Results that cannot be right fail the run (RuntimeError, exit 1) before any output is written:
    a NaN or infinite perplexity, a mixed run whose stored average is off its target, a NaN statistic."""
    for d, value in ppl.items():
        if not math.isfinite(value):
            raise RuntimeError(f"{d} perplexity is {value}: the model's outputs are not finite; nothing was written "
                               f"(check the model's weights, or compress less: larger --percdamp, more bits, less "
                               f"sparsity)")
    if summary is not None and cfg.mixed and cfg.bit_granularity == "channel" and summary.channels and \
            not abs(summary.stored_bits - cfg.target_avg_bits) <= TARGET_TOLERANCE:
        raise RuntimeError(f"the allocation stores {summary.stored_bits:.3f} bits per weight where --target_avg_bits "
                           f"{cfg.target_avg_bits} was asked; nothing was written (check --importance_weights and "
                           f"--bit_options)")
    where = nonfinite_path({"summary": None if summary is None else asdict(summary),
                            "layers": [asdict(s) for s in stats]})
    if where is not None:
        raise RuntimeError(f"the results hold NaN/inf at {where}; nothing was written")


def save_model(model: nn.Module, tokenizer, results: dict[str, Any], path: str) -> None:
    """A from_pretrained-loadable checkpoint, written whole or not at all."""
    set_stage(f"writing --save {path}")
    with atomic_directory(path, prefix=".save-") as tmp:
        if layer_store(model) is not None:
            streaming.save_streamed(model, tmp)
        else:
            model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(results, os.path.join(tmp, "compression.json"))
    set_stage("writing the outputs")


# ---------------------------------------------------------------- the command line


class UsageError(ValueError):
    """A bad flag combination: reported in one line before any work starts."""


def check_outputs(cfg: RunConfig) -> None:
    """Every output path, before any work: its parent is an existing, writable directory; a directory
    output (--save, --export) is new or an empty directory; a file output (--results_json, --plot) is not
    a directory; no two outputs share a path."""
    seen: dict[str, str] = {}
    outputs = [("--save", cfg.save, True), ("--export", cfg.export, True),
               ("--results_json", cfg.results_json, False), ("--plot", cfg.plot, False)]
    example = {"--results_json": "run.json", "--plot": "bits.png"}
    for flag, path, is_dir in outputs:
        if not path:
            continue
        full = os.path.abspath(os.path.expanduser(path))
        if full in seen:
            raise UsageError(f"{seen[full]} and {flag} both name {path}: they need different paths")
        seen[full] = flag
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            what = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise UsageError(f"{flag} {path}: its parent {parent} {what}; create the directory or choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: cannot write into {parent} (permission denied); choose a writable "
                             f"directory")
        if is_dir and os.path.exists(full) and not os.path.isdir(full):
            raise UsageError(f"{flag} {path} is a file; {flag} writes a directory: choose a new directory path")
        if is_dir and os.path.isdir(full) and os.listdir(full):
            raise UsageError(f"{flag} {path} exists and is not empty; choose a new directory")
        if not is_dir and os.path.isdir(full):
            raise UsageError(f"{flag} {path} is a directory; give a file path (e.g. "
                             f"{os.path.join(path, example[flag])})")
        if not is_dir and os.path.exists(full) and not os.access(full, os.W_OK):
            raise UsageError(f"{flag} {path} exists and is read-only; choose another file")


def check_processes(cfg: RunConfig) -> None:
    """--gpus, or the processes torchrun started: one GPU each, and a calibration window each."""
    launched = distributed.launched_size()
    if cfg.gpus < 0:
        raise UsageError(f"--gpus {cfg.gpus}: give a number of processes (GPUs), e.g. 2")
    if launched > 1 and cfg.gpus not in (0, launched):
        raise UsageError(f"--gpus {cfg.gpus} under a launcher that started {launched} processes: drop --gpus "
                         f"(torchrun's --nproc_per_node decides)")
    processes = max(launched, cfg.gpus)
    if processes <= 1:
        return
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {cfg.device}: several processes run on CUDA (NCCL) or the CPU (gloo) only")
    if dev.type == "cuda" and dev.index is not None:
        raise UsageError(f"--device {cfg.device} with {processes} processes: each takes its own GPU "
                         f"(cuda:LOCAL_RANK); give --device cuda")
    if dev.type == "cuda" and processes > torch.cuda.device_count():
        raise UsageError(f"{processes} processes need {processes} GPUs; this host has {torch.cuda.device_count()}")
    distributed.check_launch(processes, dev.type, UsageError)
    if cfg.nsamples < processes:
        raise UsageError(f"--nsamples {cfg.nsamples}: each of the {processes} processes needs a calibration "
                         f"window; give at least {processes}")


def validate(cfg: RunConfig) -> None:
    """Reject what would waste a run, each with the fix in the message."""
    if not cfg.model.strip():
        raise UsageError("the model argument is empty: give a local model directory (e.g. ../shared/models/opt-mini) "
                         "or a hub id (facebook/opt-125m)")
    for flag, value in (("--sparsity", cfg.sparsity), ("--percdamp", cfg.percdamp),
                        ("--target_avg_bits", cfg.target_avg_bits), ("--error_shrinkage", cfg.error_shrinkage),
                        ("--sensitivity_shrinkage", cfg.sensitivity_shrinkage),
                        ("--clip_min", cfg.clip_min)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} {value} is not a finite number; see --help for its range and default")
    if cfg.percdamp < 0:
        raise UsageError(f"--percdamp {cfg.percdamp} is negative: give a fraction (>= 0) of the mean Hessian "
                         f"diagonal, e.g. 0.01")
    if cfg.groupsize == 0 or cfg.groupsize < -1:
        raise UsageError(f"--groupsize {cfg.groupsize}: give a positive number of columns (e.g. 128), "
                         f"or -1 for one grid per row")
    if cfg.seqlen < 0 or cfg.seqlen == 1:
        raise UsageError(f"--seqlen {cfg.seqlen}: a window needs at least 2 tokens (one predicts the next); "
                         f"give --seqlen 2 or more (0 = the model's max positions)")
    if not cfg.eval:
        raise UsageError(f"--eval is empty: name at least one of {','.join(datautils.DATASETS)}")
    unknown = [d for d in cfg.eval if d not in datautils.DATASETS]
    if unknown:
        raise UsageError(f"unknown dataset {unknown[0]!r} in --eval; choose from {', '.join(datautils.DATASETS)}")
    weights = cfg.importance_weights
    if len(weights) != 5 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
        raise UsageError(f"--importance_weights takes five non-negative numbers, not all zero, e.g. 1,1,1,1,1 "
                         f"(got {','.join(map(str, weights))})")
    options = cfg.allowed_widths
    if cfg.mixed and len(set(options)) == 1:
        raise UsageError(f"--bit_options {options[0]} with --target_avg_bits is uniform quantization: drop "
                         f"--target_avg_bits (--wbits {options[0]} alone does that) or give several widths, "
                         f"e.g. 2,3,4,6,8")
    if cfg.prunen > 0 and cfg.prunem > 0 and cfg.blocksize > 0 and cfg.blocksize % cfg.prunem:
        divisors = [m for m in range(cfg.prunen + 1, min(cfg.blocksize, 16) + 1) if cfg.blocksize % m == 0]
        instead = f"an M that divides {cfg.blocksize} (e.g. {divisors[0]}) or " if divisors else ""
        raise UsageError(f"--prunem {cfg.prunem} does not divide --blocksize {cfg.blocksize}: N:M groups restart at "
                         f"every block; choose {instead}a --blocksize that is a multiple of {cfg.prunem}")
    if cfg.device:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise UsageError(f"--device {cfg.device!r} is not a device: use cpu or cuda (or cuda:0, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: CUDA is not available here; use --device cpu "
                             f"(or leave --device out)")
    check_processes(cfg)
    if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        raise UsageError(f"--cache_dir {cfg.cache_dir} is a file, not a directory; choose a directory "
                         f"(it is created if absent)")
    check_outputs(cfg)
    if not 0 <= cfg.sparsity < 1:
        raise UsageError(f"--sparsity {cfg.sparsity} is outside [0, 1)")
    if (cfg.prunen > 0) != (cfg.prunem > 0):
        raise UsageError("give both --prunen and --prunem (e.g. --prunen 2 --prunem 4)")
    if cfg.prunen and (cfg.prunen < 0 or cfg.prunen >= cfg.prunem):
        raise UsageError(f"--prunen {cfg.prunen} must be below --prunem {cfg.prunem}")
    if cfg.prunen and cfg.sparsity:
        raise UsageError("use either --sparsity or --prunen/--prunem, not both")
    if sorted(set(options)) != sorted(options) or not options or \
            any(b < 1 or b > 16 for b in options):
        raise UsageError(f"--bit_options {','.join(map(str, options))}: give distinct widths in 1..16, "
                         f"e.g. 2,3,4,6,8")
    if cfg.wbits != 16 and cfg.wbits not in options:
        raise UsageError(f"--wbits {cfg.wbits} is not among --bit_options {','.join(map(str, options))} (or 16 = off)")
    if cfg.mixed:
        if not cfg.quantize:
            raise UsageError("--target_avg_bits needs a base width: add --wbits 4 (or another of --bit_options)")
        lo, hi = min(options), max(options)
        if not lo <= cfg.target_avg_bits <= hi:
            raise UsageError(f"--target_avg_bits {cfg.target_avg_bits} is outside [{lo}, {hi}] of --bit_options")
        if cfg.nearest:
            raise UsageError("--target_avg_bits needs calibration statistics; drop --nearest")
        if (cfg.offload or cfg.stream) and (cfg.bit_scope == "model" or cfg.bit_granularity == "linear"):
            raise UsageError("--bit_scope model (and --bit_granularity linear) needs the whole model on the run's "
                             "device; drop --offload/--stream or use --bit_scope layer")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name} {getattr(cfg, name)!r}: give one of {'|'.join(allowed)}")
    if not 0 < cfg.clip_min <= 1:
        raise UsageError(f"--clip_min {cfg.clip_min} is outside (0, 1]: the smallest share of the min-max range "
                         f"the clip search tries, e.g. 0.5")
    for flag, value in (("--error_shrinkage", cfg.error_shrinkage),
                        ("--sensitivity_shrinkage", cfg.sensitivity_shrinkage)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{flag} {value} is outside [0, 1]")
    if cfg.bit_granularity == "linear" and not (cfg.mixed and cfg.bit_scope != "layer"):
        raise UsageError("--bit_granularity linear allocates one width per Linear across the whole model: "
                         "add --target_avg_bits, and drop --bit_scope layer")
    if cfg.clip == "width" and (not cfg.quantize or cfg.nearest or cfg.gmp):
        raise UsageError("--clip width chooses ranges from calibration statistics: it needs --wbits and "
                         "no --nearest/--gmp")
    if cfg.row_ranges == "search" and (not cfg.quantize or cfg.nearest or cfg.gmp or cfg.groupsize > 0):
        raise UsageError("--row_ranges search chooses each row's range by solves: it needs --wbits, one grid per row "
                         "(no --groupsize) and no --nearest/--gmp")
    if cfg.nearest and not cfg.quantize:
        raise UsageError("--nearest rounds weights: add --wbits 4 (or another width)")
    if cfg.nearest and cfg.prune.active and not cfg.gmp:
        raise UsageError("--nearest does not prune; add --gmp for magnitude pruning or drop --nearest")
    if cfg.solve_order == "act" and (cfg.prunen or cfg.groupsize > 0 or cfg.gmp or cfg.nearest):
        raise UsageError("--act-order works with unstructured sparsity and per-row grids only; drop it or "
                         "--prunen/--prunem/--groupsize/--gmp/--nearest")
    if cfg.solve_order == "narrow_first" and (not cfg.mixed or cfg.groupsize > 0 or cfg.gmp or cfg.nearest):
        raise UsageError("--solve_order narrow_first orders the columns of a mixed run by width, with per-row grids: "
                         "add --target_avg_bits, drop --groupsize/--gmp/--nearest, or choose another order")
    if cfg.gmp and not cfg.prune.active:
        raise UsageError("--gmp needs --sparsity (or --prunen/--prunem)")
    if cfg.gmp and cfg.quantize and not cfg.nearest:
        raise UsageError("--gmp is a pruning baseline; add --nearest to also round weights")
    if cfg.dataset not in datautils.DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(datautils.DATASETS)}")
    for flag, value, example in (("--nsamples", cfg.nsamples, 128), ("--blocksize", cfg.blocksize, 128),
                                 ("--batch_size", cfg.batch_size, 8)):
        if value < 1:
            raise UsageError(f"{flag} {value}: give a positive number (e.g. {example})")
    model_source(cfg.model)  # a missing local model directory fails here
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise UsageError(f"--data_dir {cfg.data_dir} is not a directory; give the folder holding "
                         f"wikitext-2-raw/, ptb/ and c4/ (e.g. ../shared/data)")
    if cfg.plot:
        if not cfg.quantize:
            raise UsageError("--plot shows bit-widths: add --wbits (and --target_avg_bits for mixed precision)")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    if cfg.export and not cfg.quantize:
        raise UsageError("--export packs quantized weights: add --wbits (or use --save for an fp16 checkpoint)")
    if cfg.stream and cfg.export:
        raise UsageError("--export packs the whole model in host memory; with --stream use --save (then export "
                         "from the saved directory)")
    if cfg.lm_eval:
        if cfg.offload or cfg.stream:  # before the installation: no install would make this combination work
            raise UsageError("--lm_eval runs the whole model on the device; drop --offload/--stream")
        if not lm_eval_tasks.available():
            raise UsageError("--lm_eval needs lm-evaluation-harness: pip install lm-eval accelerate")
        if cfg.lm_eval_include and not os.path.isdir(cfg.lm_eval_include):
            raise UsageError(f"--lm_eval_include {cfg.lm_eval_include} is not a directory of task definitions")
        unknown = lm_eval_tasks.unknown_tasks(cfg.lm_eval, cfg.lm_eval_include or None)
        if unknown:
            raise UsageError(f"--lm_eval: unknown task(s) {', '.join(unknown)}; give lm-eval task names, or local "
                             "task definitions with --lm_eval_include DIR")
        lm_eval_tasks.check_sources(cfg.lm_eval, cfg.lm_eval_include or None, cfg.data_dir)  # data files, the hub
    if cfg.export_format == "compressed-tensors":
        if not compressed_tensors_export.available():
            raise UsageError("--export_format compressed-tensors needs the compressed-tensors package: "
                             "pip install 'compressed-tensors>=0.17'")
        if cfg.mixed and cfg.bit_granularity != "linear":
            raise UsageError("compressed-tensors stores one width per Linear: add --bit_granularity linear "
                             "--bit_scope model, or use --export_format packed for per-channel widths")
        widths = cfg.allowed_widths if cfg.mixed else [cfg.wbits]
        if max(widths) > compressed_tensors_export.MAX_WIDTH:
            raise UsageError(f"compressed-tensors packs 1..{compressed_tensors_export.MAX_WIDTH} bits; "
                             f"choose widths up to {compressed_tensors_export.MAX_WIDTH}")


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help (unless the help already
    says it, or there is none to show: an off switch, an empty path)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == "" or \
                default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse, but a malformed command line is one line on stderr (exit 2), like every other usage error,
    instead of the whole usage block above it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def config_defaults() -> dict[str, Any]:
    """Every RunConfig field's default (a fresh copy of the lists)."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(RunConfig)
            if f.default is not MISSING or f.default_factory is not MISSING}


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = _Parser(description=__doc__, formatter_class=_HelpFormatter)
    p.set_defaults(**config_defaults())  # RunConfig's defaults are the only ones: the flags below name none
    p.add_argument("model", help="hub id (facebook/opt-125m) or local model directory")
    p.add_argument("dataset", choices=datautils.DATASETS, help="calibration data")
    p.add_argument("--seed", type=int, help="seed for sampling the calibration windows")
    p.add_argument("--nsamples", type=int, help="number of calibration windows")
    p.add_argument("--percdamp", type=float, help="damping, fraction of the mean Hessian diagonal")
    p.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    p.add_argument("--prunen", type=int, help="N of N:M sparsity")
    p.add_argument("--prunem", type=int, help="M of N:M sparsity")
    p.add_argument("--blocksize", type=int, help="columns per lazy-update block (and mask block)")
    p.add_argument("--gmp", action="store_true", help="magnitude pruning baseline (no calibration)")
    p.add_argument("--wbits", type=int, help="weight bits; 16 = no quantization")
    p.add_argument("--minlayer", type=int, help="compress layers with index >= this")
    p.add_argument("--maxlayer", type=int, help="compress layers with index < this")
    p.add_argument("--prune_only", type=str, help="compress only Linear layers whose name contains this")
    p.add_argument("--invert", action="store_true", help="invert the layer selection")
    p.add_argument("--solve_order", choices=CHOICES["solve_order"],
                   help="the order the solver takes each Linear's columns in: stored; act (GPTQ's act order); "
                        "narrow_first (mixed runs: narrower widths first within each mask block or N:M group). "
                        "Default auto: act for mixed runs without sparsity or groups, stored otherwise")
    p.add_argument("--act-order", "--act_order", dest="solve_order", action="store_const", const="act",
                   help="GPTQ's flag: --solve_order act, columns by decreasing activation energy")
    p.add_argument("--no-act-order", "--no_act_order", dest="solve_order", action="store_const", const="stored",
                   help="--solve_order stored, also in mixed runs")
    p.add_argument("--save", type=str, help="write a from_pretrained checkpoint to this (new) directory")
    p.add_argument("--export", type=str, help="write the packed form (bit-packed codes, bit map, ranges, mask) to this (new) directory")
    p.add_argument("--export_format", choices=("packed", "compressed-tensors"), help="--export's format: our packed one (export.load_compressed reads it), or compressed-tensors "
                        "(transformers, vLLM and SGLang load it; uniform widths or --bit_granularity linear)")
    p.add_argument("--lm_eval", type=_list(str), help="lm-evaluation-harness tasks to run on the compressed model, comma-separated (needs lm-eval)")
    p.add_argument("--lm_eval_include", type=str, help="a directory of local lm-eval task definitions (YAML), for --lm_eval")
    p.add_argument("--groupsize", type=int, help="columns per quantization group; -1 = one grid per row")
    p.add_argument("--sym", action="store_true", help="symmetric quantization grid")
    p.add_argument("--nearest", action="store_true", help="round-to-nearest baseline (no calibration)")
    p.add_argument("--seqlen", type=int, help="window length; 0 = the model's max positions")
    p.add_argument("--data_dir", type=str, help="offline data (layout of ../shared/data)")
    p.add_argument("--cache_dir", type=str, default=os.environ.get("OPT_ENHANCED_CACHE"),
                   help="cache of tokenized data (default: $OPT_ENHANCED_CACHE, else none)")
    p.add_argument("--results_json", type=str, help="write config, perplexities, statistics, timings here")
    p.add_argument("--plot", type=str, help="PNG heatmap of average bits per module and layer")
    p.add_argument("--target_avg_bits", type=float, help="mixed precision: average code bits per stored weight (with sparsity: per kept weight)")
    p.add_argument("--bit_method", choices=CHOICES["bit_method"], help="bit allocator")
    p.add_argument("--bit_scope", choices=CHOICES["bit_scope"],
                   help="one allocation over the whole model (errors in units of the loss; needs it on the GPU), or each "
                        "Linear meeting the target; auto = model unless offloaded or streamed")
    p.add_argument("--bit_granularity", choices=CHOICES["bit_granularity"], help="one width per input channel, or per Linear (q/k/v tied; needs model scope)")
    p.add_argument("--clip", choices=CHOICES["clip"], help="shrink each width's range by the factor (per Linear) that minimises the error "
                        "(--clip_objective); auto = on for mixed precision, off (the reference grid) for uniform runs")
    p.add_argument("--clip_objective", choices=CHOICES["clip_objective"],
                   help="the loss that picks each width's range factor: the output error of actual solves on a sample "
                        "of rows (solve), the solver's estimate, or each column's error at its full cost H_jj")
    p.add_argument("--clip_min", type=float, help="the smallest range factor the clip search tries (1 = min-max only)")
    p.add_argument("--row_ranges", choices=CHOICES["row_ranges"],
                   help="each row's quantization range: from the dense weights (the reference), or chosen by trial "
                        "solves among that range and (with pruning) the pruned weights' range, each scaled by 1/0.9/0.8 "
                        "(search: no extra bits, six or seven solves per Linear)")
    p.add_argument("--error_shrinkage", type=float, help="share of each channel's estimated error replaced by its Linear's mean (hedges against "
                        "text the calibration data does not excite; default: " +
                        ", ".join(f"{v} for {k}" for k, v in bitalloc.ERROR_SHRINKAGE.items()) + ")")
    p.add_argument("--shrinkage_mean", choices=CHOICES["shrinkage_mean"],
                   help="what --error_shrinkage moves a channel's error toward: its Linear's mean per channel, or its "
                        "mean per stored weight times the channel's stored weights (the same without sparsity)")
    p.add_argument("--channel_cost", choices=CHOICES["channel_cost"],
                   help="a channel's cost at a width: its importance times its estimated error, or the estimated error "
                        "alone (the importance then only ranks quantile's channels)")
    p.add_argument("--sensitivity_shrinkage", type=float,
                   help="model scope: share of each output's loss sensitivity replaced by its Linear's mean")
    p.add_argument("--bit_options", type=_list(int),
                   help="allowed widths (default: " + ",".join(map(str, bitalloc.BIT_OPTIONS)) + "; budget per channel in "
                        "model scope with sparsity at 4 bits or more: the widths next to the target, 3,4,6 at 4.0)")
    p.add_argument("--importance_weights", type=_list(float), help="weights of energy,outlier,weight,obs,sensitivity")
    p.add_argument("--eval", type=_list(str), help="datasets to report perplexity on")
    p.add_argument("--batch_size", type=int, help="windows per forward pass")
    p.add_argument("--device", type=str, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--gpus", type=int, help="run as this many processes, one GPU each, through torch.distributed.run (the same as "
                   "torchrun --standalone --nproc_per_node N opt_enhanced.py ...); with --device cpu, CPU processes")
    p.add_argument("--offload", action="store_true",
                   help="keep the model on the CPU, one decoder layer on the GPU at a time (automatic when it does not fit)")
    p.add_argument("--no-overlap", "--no_overlap", dest="overlap", action="store_false",
                   help="move offloaded layers to the GPU and back in line instead of behind the computation")
    p.add_argument("--stream", action="store_true",
                   help="read each decoder layer from the local safetensors checkpoint when it is needed and write it "
                        "back compressed (host memory: a few layers, not the model); implies --offload")
    p.add_argument("--no_fused", action="store_true",
                   help="plain PyTorch column loop even on CUDA, launched one by one (the default there: the fused "
                        "Triton kernel, small solves replayed as CUDA graphs)")
    p.add_argument("--quiet", action="store_true", help="only errors and the final results")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (main() reads it)")
    args = vars(p.parse_args(argv))
    args.pop("debug")
    return RunConfig(**args)


def check_model(cfg: RunConfig) -> None:
    """The checks that need the model's config and tokenizer but no weights (seconds, before any work):
    a supported family, calibration windows whose layer inputs fit in the device's memory, a tokenizer that fits
    the embedding, a layer selection that picks some Linear, and a way to the data (--data_dir, or a hub that
    answers)."""
    from modelutils import check_export_files, hub_reachable, linear_names

    set_stage("checking the model")
    config = load_config(cfg.model)
    check_export_files(cfg.model, config)  # a damaged export, named, before any weight is read
    compressed_tensors_export.check_layout(cfg, config, UsageError)  # its groups must tile every row
    seqlen = cfg.seqlen or config.max_position_embeddings
    width = 2 if str(config.dtype).endswith("float16") else 4  # (config.torch_dtype would draw a deprecation warning)
    windows = -(-cfg.nsamples // distributed.launched_size())  # each process holds its share of the windows
    need, dev = windows * seqlen * config.hidden_size * width, run_device(cfg)
    if need > device_memory(dev):
        raise UsageError(f"--nsamples {cfg.nsamples} windows of {seqlen} tokens are {need / 2 ** 30:.1f} GiB of layer "
                         f"inputs (hidden size {config.hidden_size}) per process, more than the "
                         f"{device_memory(dev) / 2 ** 30:.1f} GiB the {dev.type} has; lower --nsamples (e.g. 128) or "
                         f"--seqlen")
    if cfg.prune.active or cfg.quantize:
        names = linear_names(config)
        if not any(cfg.selected(i, n) for i, layer in enumerate(names) for n in layer):
            flags = f"--minlayer {cfg.minlayer} --maxlayer {cfg.maxlayer}" + \
                (f" --prune_only {cfg.prune_only}" if cfg.prune_only else "") + (" --invert" if cfg.invert else "")
            raise UsageError(f"{flags} selects no Linear layer of {cfg.model} (layers 0..{len(names) - 1}, each with "
                             f"{', '.join(names[0] if names else [])}): nothing would be compressed; widen the "
                             f"selection")
    tokenizer = datautils.get_tokenizer(cfg.model)
    # More tokens than embedding rows cannot run; fewer than half of them leaves most rows unused, which no model
    # is trained with (their tokenizers fill 90-100% of it), but it runs, to a perplexity that means nothing.
    if not config.vocab_size // 2 <= len(tokenizer) <= config.vocab_size:
        raise UsageError(f"the tokenizer in {cfg.model} has {len(tokenizer)} tokens but the model's embedding has "
                         f"{config.vocab_size}: its tokenizer files belong to another model; copy the model's own")
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if cfg.data_dir is None and not offline and not hub_reachable():
        raise UsageError("the Hugging Face hub cannot be reached for the datasets: pass --data_dir DIR with the "
                         "offline data (layout of ../shared/data)")


def _outputs(cfg: RunConfig | None) -> dict[str, str]:
    if cfg is None:
        return {}
    return {flag: path for flag, path in (("save", cfg.save), ("export", cfg.export),
                                          ("results_json", cfg.results_json), ("plot", cfg.plot)) if path}


def _remove_new_outputs(cfg: RunConfig | None, existed: dict[str, bool]) -> None:
    """After a failed or interrupted run: remove what it wrote under the output paths (validated at the
    start as absent or empty directories, so nothing of the user's goes)."""
    for flag, path in _outputs(cfg).items():
        if flag not in existed:  # never validated: leave it alone
            continue
        if flag in ("save", "export"):
            if os.path.isdir(path) and not existed[flag]:
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isdir(path):  # was an empty directory: empty it again
                for entry in os.listdir(path):
                    full = os.path.join(path, entry)
                    shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
        elif not existed[flag] and os.path.isfile(path):
            os.remove(path)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + (" ..." if len(text) > 500 else "")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a usage error (flags, model, data or output paths: nothing was started);
    1 the run failed (non-finite numbers, results that cannot be right, unexpected errors); 130/143
    interrupted by SIGINT/SIGTERM. Every error is one line on stderr; --debug adds the traceback."""
    import traceback

    from modelutils import ModelError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    set_stage("checking the flags")
    cfg, existed, started = None, {}, False
    with sigterm_interrupts():
        try:
            cfg = parse_args(argv)
            validate(cfg)
            if cfg.gpus > 1 and distributed.launched_size() == 1:
                set_stage(f"running {cfg.gpus} processes")
                return distributed.launch(cfg.gpus, [os.path.abspath(__file__), *argv])
            existed = {flag: os.path.exists(path) for flag, path in _outputs(cfg).items()}  # dirs: empty ones
            with device_starting(cfg):  # the GPU starts while transformers is imported: seconds each
                set_stage("importing transformers")
                import_transformers()
            check_model(cfg)
            started = True
            with distributed.session(run_device(cfg)), quiet_libraries(cfg.quiet):
                results = run(cfg, startup=process_seconds())
            error = None
        except (UsageError, datautils.DataError, ModelError, FileNotFoundError) as e:
            error, code, message = e, 2, _one_line(e)
        except distributed.PeerLost as e:
            error, code, message = e, 1, f"lost contact with the other processes while {current_stage()}: {e}"
        except (FloatingPointError, RuntimeError) as e:
            error, code, message = e, 1, _one_line(e)
        except KeyboardInterrupt as e:
            error, code, message = e, 130, f"interrupted (SIGINT) while {current_stage()}; temporary outputs removed"
        except Interrupted as e:
            error, code, message = e, 143, f"terminated (SIGTERM) while {current_stage()}; temporary outputs removed"
        except Exception as e:
            error, code = e, 1
            message = f"unexpected {type(e).__name__} while {current_stage()}: {_one_line(e)} (rerun with --debug " \
                      f"for the traceback)"
        rank, processes = distributed.launched_rank(), distributed.launched_size()
        if error is not None:  # still inside: a second signal during this cleanup is ignored
            if debug:
                traceback.print_exception(error)
            if rank == 0:  # the one writer
                _remove_new_outputs(cfg, existed)
            streaming.remove_scratch()  # each process's --stream files (its finalizers never run: os._exit)
            where = f"rank {rank}: " if processes > 1 and started else ""
            reported = distributed.report(error, code, f"error: {where}{message}")  # under --gpus: the launcher says it
            if (rank == 0 or started) and not reported:  # the checks before the run give every process the same answer
                print(f"error: {where}{message}", file=sys.stderr)
            return code
    if rank != 0:
        return 0
    ppl = results["perplexity"]
    print(json.dumps({"perplexity": {k: round(v, 3) for k, v in ppl.items()}, "timings": results["timings"],
                      "outputs": _outputs(cfg)}))
    return 0


if __name__ == "__main__":
    code = main()
    # Every output is written and closed by now. The interpreter's own exit would tear down torch, CUDA and
    # every module (1.5-2 s after an OPT-1.3B run, BENCHMARKS.md §2) and could be interrupted halfway by a
    # second Ctrl-C; ending the process at once does neither.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
