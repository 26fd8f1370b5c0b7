"""OPT plumbing: loading, finding Linear layers, and running decoder layers one at a time.

Layers are processed one at a time so the model itself can stay on the CPU; only the layer at
hand (and the activations of the calibration or evaluation windows) live on the GPU.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn


def is_local_path(model: str) -> bool:
    """A model argument that names a directory rather than a hub id ("org/name")."""
    return os.path.isdir(model) or model.startswith((".", "/", "~")) or model.count("/") > 1


def model_source(model: str) -> str:
    """What from_pretrained should get: the expanded local directory, or the hub id as given."""
    if not is_local_path(model):
        return model
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {model}")
    return path


def load_opt(model: str, quiet: bool = False) -> nn.Module:
    """OPTForCausalLM from a local directory or the hub, in the checkpoint's dtype, eval mode."""
    from transformers import OPTForCausalLM
    from transformers.utils import logging

    if quiet:
        logging.disable_progress_bar()
    net = OPTForCausalLM.from_pretrained(model_source(model), dtype="auto")
    net.config.use_cache = False
    return net.eval()


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """All nn.Linear submodules by qualified name (the weights the solver compresses)."""
    return {
        f"{prefix}.{name}" if prefix else name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }


def decoder_io_modules(model: nn.Module) -> list[nn.Module]:
    """The modules outside the decoder layers that produce layer-0 inputs or consume the last output."""
    dec = model.model.decoder
    inputs = [m for m in (dec.embed_tokens, dec.embed_positions, dec.project_in) if m is not None]
    return inputs + head_modules(model)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering decoder layer 0 for every window, plus the keyword arguments the
    decoder passes to its layers (attention mask, positions, ...), whatever this transformers
    version computes. The windows all have one length, so one set of kwargs serves every batch."""
    layers = model.model.decoder.layers
    dtype = next(model.parameters()).dtype
    hidden = torch.zeros(ids.shape[0], ids.shape[1], model.config.hidden_size, dtype=dtype, device=device)
    kwargs: dict[str, Any] = {}
    first = layers[0]

    def catch(_module, args, kw):
        x = args[0] if args else kw["hidden_states"]
        hidden[catch.at:catch.at + x.shape[0]] = x
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            catch.at = start
            try:
                model(ids[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return hidden, _batch_free(kwargs)


def _batch_free(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Attention masks are per batch; keep one row so they broadcast over any batch size."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] > 1:
            v = v[:1]
        out[k] = v
    return out


@torch.no_grad()
def forward_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
                  out: torch.Tensor | None = None) -> None:
    """Run one decoder layer over all windows in batches, writing into `out` (may be `hidden`
    itself: each batch is read before its slice is overwritten) or, if None, only for the hooks."""
    for start in range(0, hidden.shape[0], batch_size):
        y = layer(hidden[start:start + batch_size], **kwargs)
        if out is not None:
            out[start:start + batch_size] = layer_output(y)


def layer_output(y: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states, alone or first in a tuple, by transformers version."""
    return y[0] if isinstance(y, tuple) else y


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules between the last decoder layer's output and the logits."""
    dec = model.model.decoder
    return [m for m in (dec.final_layer_norm, dec.project_out, model.lm_head) if m is not None]


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The vocabulary logits of the last decoder layer's output."""
    for m in head_modules(model):
        hidden = m(hidden)
    return hidden


def hook_inputs(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]) -> list:
    """Forward hooks that pass each module's input activations to sink(name, x)."""
    return [m.register_forward_hook(lambda _m, inp, _out, n=n: sink(n, inp[0].data)) for n, m in modules.items()]


def check_finite(x: torch.Tensor, what: str) -> None:
    """Stop at the first NaN/Inf with the name of the layer that produced it."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"NaN/Inf in {what}")
