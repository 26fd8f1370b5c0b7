"""The Linears of opt-mini's first layers with their solvers, for the CPU probes here (clip_true_error.py,
row_range_error.py): each layer is fed the uncompressed model's activations, its Hessians collected as a
run collects them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # experiments/

import torch  # noqa: E402

import opt_enhanced  # noqa: E402
from families import decoder_of  # noqa: E402
from modelutils import capture_layer_inputs, decoder_layers, find_linears, forward_layer, load_model  # noqa: E402
from pipeline.calibrate import collect_hessians  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.run import tokenize  # noqa: E402
from sparsegpt_enhanced import SparseGPT  # noqa: E402
from systems.progress import Stages  # noqa: E402


def first_linears(model_dir: str, data_dir: str, sparsity: str, wbits: int, nsamples: str, layers: int
                  ) -> Iterator[tuple[int, str, torch.Tensor, SparseGPT, RunConfig]]:
    """(layer index, Linear name, its weight in fp32, its solver, the run's settings) for every Linear of the
    first `layers` decoder layers, on the CPU."""
    cfg = opt_enhanced.parse_args([model_dir, "c4", "--data_dir", data_dir, "--sparsity", sparsity, "--wbits", str(wbits),
                         "--nsamples", nsamples])
    dev = torch.device("cpu")
    model = load_model(cfg.model, True)
    _, _, calibration, _ = tokenize(cfg, Stages(dev))
    inputs = capture_layer_inputs(model, calibration, dev, cfg.batch_size)
    shared = decoder_of(model).shared_input
    for i, layer in enumerate(decoder_layers(model)[:layers]):
        linears = find_linears(layer)
        solvers = collect_hessians(layer, list(linears), inputs, dev, shared)
        for name, linear in linears.items():
            yield i, name, linear.weight.data.float(), solvers[shared.get(name, name)], cfg
        forward_layer(layer, inputs, inputs.hidden)


def probe_arguments(parser: argparse.ArgumentParser, layers: int) -> None:
    """The flags every probe here passes to `first_linears`: sparsity, layers, calibration windows, model, data."""
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--nsamples", default="32")
    parser.add_argument("--model", default=".local/opt-mini")
    parser.add_argument("--data_dir", default=".local/data")
