"""Perplexity with the SparseGPT protocol: WikiText-2, PTB and C4 test text in non-overlapping windows, the mean
of each window's mean token NLL, exponentiated. The same numbers whether the model runs whole or a layer at a
time, on one process or several.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from modelutils import capture_layer_inputs, decoder_layers, logits_from_hidden, resident, walk_layers
from systems import distributed
from systems.progress import Log


def eval_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The SparseGPT protocol's windows of a (1, n) token sequence: non-overlapping, `seqlen` long, the tail that
    does not fill one dropped; (windows, seqlen)."""
    nwin = ids.numel() // seqlen
    return ids[0, : nwin * seqlen].view(nwin, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, dev: torch.device, batch_size: int,
               whole_model: bool | None = None, log: Log = Log(True), overlap: bool = True) -> float:
    """The SparseGPT protocol over `windows` (`eval_windows`): mean token NLL per window, exp of the mean.

    Whole-model batched forwards when the model sits on the device (the default there), else
    layer by layer over all windows, for models that only visit the GPU one layer at a time.
    Under torchrun each rank takes its shard of the windows and the NLL sums are added. `overlap` False moves
    offloaded layers in line (--no-overlap)."""
    nwin = len(windows)
    windows = distributed.shard(windows)
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
    inputs = capture_layer_inputs(model, windows, dev, batch_size)
    progress = lambda items: log.bar(items, len(layers), f"evaluate {nwin} windows, layer by layer")
    for _ in walk_layers(model, dev, inputs, progress, overlap=None if overlap else False):
        pass  # the walk itself runs each layer over the windows
    for start in range(0, mine, batch_size):
        logits = logits_from_hidden(model, inputs.hidden[start:start + batch_size])
        nll += window_nll(logits, windows[start:start + batch_size].to(dev))
    return math.exp(distributed.total(nll).item() / nwin)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over windows of each window's mean next-token NLL (fp32 softmax)."""
    logits = logits[:, :-1].float()
    labels = ids[:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return loss.view(labels.shape).mean(1).double().sum()
