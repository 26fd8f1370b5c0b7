"""Where a run computes: its device, the model loaded and placed there (whole, or a layer at a time), and the
device started early (CUDA, cuBLAS and the Triton kernel warmed up while other start-up work runs).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from formats.compressed_tensors_checkpoint import check_checkpoint
from formats.packed import check_export, load_compressed
from modelutils import (ModelError, check_weights_finite, decoder_io_modules, decoder_layers, first_line,
                        is_packed_export, layer_store, load_model, model_source)
from pipeline.config import RunConfig
from quant import QuantGrid
from sparsegpt_enhanced import SparseGPT
from systems import distributed, streaming
from systems.interrupts import Background


def run_device(cfg: RunConfig) -> torch.device:
    """Where layers are processed: --device, else CUDA if present; under torchrun each process's own GPU."""
    return distributed.local_device(torch.device(cfg.solve_device))


def use_device(dev: torch.device) -> None:
    """Make a numbered GPU (cuda:LOCAL_RANK under torchrun) the calling thread's current device: Triton
    launches its kernels there whatever device the tensors are on, and a tensor made on plain "cuda"
    lands there (on GPU 0 it would cost every process a CUDA context on GPU 0)."""
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def device_memory(dev: torch.device) -> int:
    """Bytes of memory the device has in all (the GPU's, or the machine's for the CPU)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def load_and_place(cfg: RunConfig, dev: torch.device) -> nn.Module:
    """Load the model (a checkpoint, streamed, or our packed export), place it (`place`) and scan its weights for
    NaN/Inf where they were placed."""
    use_device(dev)  # this runs on a thread of its own
    if cfg.stream:  # the compressed layers wait beside the --save target, so that saving only links them
        model = streaming.load_streamed(cfg.model, os.path.dirname(os.path.abspath(cfg.save)) if cfg.save else None)
    elif is_packed_export(cfg.model):
        model = load_packed(cfg.model)
    else:
        model = load_model(cfg.model, cfg.quiet, check_values=False)
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
    solver.fasterprune(weight, cfg.solve_settings, grid, bits)
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


def load_packed(directory: str) -> nn.Module:
    """Our packed export (--export_format packed), its damage reported as a ModelError naming the directory."""
    check_export_files(directory)
    try:
        model = load_compressed(os.path.expanduser(directory))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the packed export in {directory} ({first_line(e)})") from e
    return model.eval()


def check_export_files(model: str, config=None) -> None:
    """ModelError naming the file, before any weight is read, for an export whose files contradict themselves or
    their config: a packed export (formats.packed.check_export: truncated or damaged safetensors, streams of the
    wrong length) or a compressed-tensors checkpoint (formats.compressed_tensors_checkpoint.check_checkpoint:
    tensors packed at another width than config.json says). Anything else passes: from_pretrained checks plain
    checkpoints."""
    source = model_source(model)
    if not os.path.isdir(source):
        return
    try:
        if os.path.isfile(os.path.join(source, "packed.safetensors")):
            check_export(source)
        elif config is not None and (getattr(config, "quantization_config", None) or {}).get("quant_method") == \
                "compressed-tensors":
            check_checkpoint(source, config.quantization_config)
    except ValueError as e:
        raise ModelError(" ".join(str(e).split())) from e

