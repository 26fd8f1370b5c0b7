"""Model scope (--bit_scope model): one bit allocation over every channel of the model, errors in units of the
loss. Each output's loss sensitivity comes from one backward pass over the dense model (`output_sensitivity`);
every channel is costed on the dense model; each Linear's share of the budget (or its one width) is fixed
before the sequential loop (`BitPlan`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from families import decoder_of
from mixed import bitalloc
from mixed.costs import ChannelCosts, channel_costs
from mixed.precision import ClipSearch
from modelutils import (LayerInputs, decoder_layers, find_linears, head_modules, layer_output, linear_name,
                        logits_from_hidden, resident, walk_layers)
from pipeline.calibrate import collect_hessians, selected_names
from pipeline.config import RunConfig
from systems import distributed
from systems.progress import Log, TimeLeft
from systems.solve_graphs import SolveGraphs


def output_sensitivity(model: nn.Module, calibration: torch.Tensor, inputs: LayerInputs, dev: torch.device,
                       log: Callable[[str], None] = lambda msg: None) -> dict[str, torch.Tensor]:
    """Mean over the calibration tokens of (dLoss/dy_i)^2 for every output y_i of every decoder Linear:
    the diagonal Fisher of the dense model's next-token loss. An output error e_i costs the loss about
    F_i e_i^2 / 2, so it puts the Hessian-weighted errors of different Linears in one unit.

    `inputs`: those of decoder layer 0 (capture_layer_inputs), in batches of `inputs.batch_size` windows; those of
    the windows of `calibration`, the first of them (a run may give fewer windows than it calibrated on). The
    backward pass goes a layer at a
    time (backward_layer_by_layer), so the GPU holds one layer's activations rather than the whole
    model's (OPT-6.7B ran out of 80 GB otherwise), in fp32 (fp16 -> fp32 -> fp16 is exact) with TF32
    matmuls. Each layer is visited twice per batch, so the layers must stay on the GPU: not with --offload.
    With more than one batch, `log` gets a line per batch with the time left (at OPT-175B width the pass takes
    about 11 s per decoder layer on an H100, minutes for a whole model)."""
    layers = decoder_layers(model)
    if not resident(layers, dev):
        raise RuntimeError("--bit_scope model needs the whole model on the run's device (its loss gradients visit "
                           "every layer twice per batch); drop --offload or use --bit_scope layer")
    kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.kwargs.items()}
    hidden, batch_size = inputs.hidden, inputs.batch_size
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
    starts = range(0, len(calibration), batch_size)
    left = TimeLeft(len(starts), "the sensitivity pass")
    try:
        for start in starts:
            ids = calibration[start:start + batch_size].to(dev)
            backward_layer_by_layer(model, hidden[start:start + len(ids)], kwargs, ids)
            tokens += ids[:, 1:].numel()
            if len(starts) > 1:
                log(f"loss sensitivity: windows {start + len(ids)}/{len(calibration)}, {left.step()}")
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
    shrink: dict[str, dict[int, float]] = field(default_factory=dict)  # each Linear's range factors, if kept

    def range_factors(self, name: str, search: ClipSearch) -> dict[int, float] | None:
        """The factors the plan chose for a Linear when the search keeps them (`ClipSearch.planned`), else None."""
        return self.shrink.get(name) if search.planned else None


def plan_model_bits(model: nn.Module, calibration: torch.Tensor, inputs: LayerInputs, cfg: RunConfig,
                    dev: torch.device, log: Log, graphs: SolveGraphs | None = None) -> BitPlan:
    """--bit_scope model: cost every channel on the dense model (`inputs`: those of its first layer, left as
    they are), errors in units of loss, then one allocation for all."""
    shared = decoder_of(model).shared_input
    nlayers = len(decoder_layers(model))
    with log.stage("sensitivity"):
        sensitivity = output_sensitivity(model, calibration[:cfg.sensitivity_windows or len(calibration)], inputs,
                                         dev, log)
    log("measured the loss's sensitivity to every Linear output")
    inputs = replace(inputs, hidden=inputs.hidden.clone())
    priced: dict[str, ChannelCosts] = {}
    tied: list[list[str]] = []
    settings = cfg.solve_settings
    left = TimeLeft(nlayers, "planning")
    for i, layer in walk_layers(model, dev):  # the plan changes no layer: the Hessians' forward gives its output
        linears = find_linears(layer)
        chosen = selected_names(layer, i, cfg)
        with log.stage("plan: hessians"):
            solvers = collect_hessians(layer, chosen, inputs, dev, shared, linear_name(model, i, ""), graphs,
                                       out=inputs.hidden)
        groups: dict[str, list[str]] = {}
        for n in chosen:
            name = linear_name(model, i, n)
            with log.stage("plan: costs"):
                priced[name] = channel_costs(linears[n].weight.data, solvers[shared.get(n, n)], settings, cfg.wbits,
                                             cfg.mixed_precision, sensitivity[name])
            groups.setdefault(shared.get(n, n), []).append(name)  # q/k/v (and gate/up): one width
        tied += groups.values()
        del solvers  # as in compress: not alive while the next layer's are built
        log(f"costed layer {i + 1}/{nlayers}, {left.step()}")
    mp = cfg.mixed_precision
    shrink = {name: c.shrink for name, c in priced.items()}
    if mp.granularity == "linear":
        return BitPlan(widths=bitalloc.plan_linear_widths(priced, tied, mp), shrink=shrink)
    return BitPlan(budgets=bitalloc.plan_budgets(priced, mp), sensitivity=sensitivity, shrink=shrink)


def allocation_scope(cfg: RunConfig, model: nn.Module, dev: torch.device) -> str:
    """--bit_scope as run. auto is model, one allocation over every channel with errors in units of the loss,
    which won on validation text (benchmarks/mixed_precision.md), when every decoder layer is on the device: the loss
    gradients it needs visit each layer twice per batch. An offloaded or streamed model gets layer scope
    (each Linear meets the target); one width per Linear always needs model scope."""
    if cfg.bit_scope != "auto":
        return cfg.bit_scope
    if cfg.bit_granularity == "linear" or resident(decoder_layers(model), dev):
        return "model"
    return "layer"
