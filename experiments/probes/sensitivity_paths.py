"""The model-scope loss-sensitivity pass both ways on one model: the batch's whole graph kept, and layer by layer
(pipeline/model_scope.py, output_sensitivity's whole_graph): whether the sums are the same bit for bit on this
device, and each path's seconds (the second of two calls), on 128 c4 windows of 2048 tokens (fewer on a CPU).

    python experiments/probes/sensitivity_paths.py MODEL_DIR DATA_DIR
"""
from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, ".")
from datautils import get_calibration  # noqa: E402
from modelutils import capture_layer_inputs, load_model  # noqa: E402
from pipeline.model_scope import graph_fits, output_sensitivity  # noqa: E402
from tokenizer_loading import get_tokenizer  # noqa: E402


def main() -> None:
    model_dir, data_dir = sys.argv[1:3]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nsamples, seqlen = (128, 2048) if dev.type == "cuda" else (8, 256)
    model = load_model(model_dir, quiet=True).to(dev)
    ids = get_calibration("c4", get_tokenizer(model_dir), nsamples, seed=0, seqlen=seqlen, data_dir=data_dir)
    inputs = capture_layer_inputs(model, ids, dev, batch_size=8)
    print("graph fits:", graph_fits(model, inputs.hidden[:1], inputs.kwargs, inputs.batch_size, dev))
    sums, seconds = {}, {}
    for whole in (True, False, True, False):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        sums[whole] = output_sensitivity(model, ids, inputs, dev, whole_graph=whole)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds[whole] = time.perf_counter() - tick
    same = all(torch.equal(sums[True][n], sums[False][n]) for n in sums[True])
    worst = max(float(((sums[True][n] - sums[False][n]).abs().max() / sums[False][n].abs().max())) for n in sums[True])
    print(f"{dev}: whole graph {seconds[True]:.2f} s, layer by layer {seconds[False]:.2f} s; "
          f"identical sums: {same} (largest difference relative to a Linear's largest: {worst:.2e})")


if __name__ == "__main__":
    main()
