"""Tests on tiny OPT models built here; CPU, seconds each. Run: python -m pytest -q"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM

from mixed import precision
import opt_enhanced as oe
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig
from pipeline.evaluate import eval_windows, perplexity
from pipeline.model_scope import output_sensitivity
from conftest import tiny_model, write_data
from modelutils import capture_layer_inputs, find_linears, resident
from quant import QuantGrid, round_to_nearest
from systems.interrupts import Background
from systems.progress import Log
from sparsegpt_enhanced import PruneSpec, SolveSettings, SparseGPT, magnitude_prune, solve_order

OPTIONS = [2, 3, 4, 6, 8]


def correlated_inputs(n: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few loud ones, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / math.sqrt(columns)
    scale = torch.ones(columns)
    scale[:3] = 8.0
    return (torch.randn(n, columns, generator=g) @ mix + 0.3 * torch.randn(n, columns, generator=g)) * scale


def solver_for(x: torch.Tensor) -> SparseGPT:
    s = SparseGPT(x.shape[1])
    s.add_batch(x)
    return s


def grid_codes(Q: torch.Tensor, W: torch.Tensor, bits: torch.Tensor, sym: bool = False) -> torch.Tensor:
    """(Q / scale + zero) per column at its own width, using the dense weight's per-row ranges."""
    grid = QuantGrid.for_weight(W, sym)
    scale, zero, maxq = grid.column_params(0, W.shape[1], bits)
    return Q / scale + zero, maxq


def run_cfg(model, calib, **kw) -> list:
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=calib.shape[0], blocksize=16, **kw)
    validate(cfg)
    return compress(model, calib, cfg, torch.device("cpu"), Log(True)).stats


# ---------------------------------------------------------------- solver


def test_unstructured_sparsity_is_exact_per_block():
    W = torch.randn(24, 40)
    res = solver_for(correlated_inputs(256, 40)).fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16))
    # blocks of 16, 16 and 8 columns: floor(24*16*0.5) + floor(24*16*0.5) + floor(24*8*0.5)
    assert int(res.mask.sum()) == 192 + 192 + 96
    assert torch.all(res.weight[res.mask] == 0)
    assert int((res.weight == 0).sum()) == 480


def test_nm_pattern_holds_in_every_group():
    W = torch.randn(16, 32)
    res = solver_for(correlated_inputs(256, 32)).fasterprune(W, SolveSettings(PruneSpec(prunen=2, prunem=4), blocksize=16))
    zeros = (res.weight == 0).view(16, 8, 4).sum(2)
    assert torch.all(zeros == 2)
    assert torch.equal(res.mask, res.weight == 0)


def test_joint_quantization_keeps_pruned_zero_and_values_on_grid():
    W = torch.randn(16, 48)
    bits = torch.full((48,), 4)
    grid = QuantGrid.for_weight(W, sym=False)
    res = solver_for(correlated_inputs(256, 48)).fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16), grid, bits)
    assert torch.all(res.weight[res.mask] == 0)
    assert int(res.mask.sum()) == 16 * 48 // 2
    q, maxq = grid_codes(res.weight, W, bits)
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.round().min() >= 0 and q.round().max() <= 15


def test_lazy_blocks_are_an_exact_reformulation():
    """GPTQ with lazy updates gives the same result whatever the block size."""
    W = torch.randn(12, 64)
    x = correlated_inputs(512, 64)
    bits = torch.full((64,), 3)
    s = solver_for(x)
    a = s.fasterprune(W, SolveSettings(PruneSpec(), blocksize=64), QuantGrid.for_weight(W, False), bits).weight
    b = s.fasterprune(W, SolveSettings(PruneSpec(), blocksize=8), QuantGrid.for_weight(W, False), bits).weight
    assert (a != b).float().mean() < 0.01  # only rounding ties may flip


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    W = torch.randn(32, 64)
    x = correlated_inputs(1024, 64, seed=1)
    q = solver_for(x).fasterprune(W, SolveSettings(PruneSpec()), QuantGrid.for_weight(W, False), torch.full((64,), 3)).weight
    rtn = round_to_nearest(W, 3, sym=False)
    err = lambda Q: ((x @ (W - Q).t()) ** 2).sum()
    assert err(q) < 0.7 * err(rtn)


def test_groups_give_each_group_its_own_grid():
    W = torch.randn(8, 64)
    W[:, 32:] *= 10
    res = solver_for(correlated_inputs(256, 64)).fasterprune(W, SolveSettings(PruneSpec(), blocksize=32), grid := QuantGrid.for_weight(W, False, groupsize=32), torch.full((64,), 4))
    assert grid.xmin.shape == (8, 2)
    assert torch.all(grid.xmax[:, 1] > 3 * grid.xmax[:, 0])
    scale, zero, maxq = grid.column_params(0, 64, torch.full((64,), 4))
    q = res.weight / scale + zero
    assert torch.allclose(q, q.round(), atol=1e-3)


def test_mixed_bits_each_column_on_its_own_grid():
    W = torch.randn(16, 40)
    bits = torch.tensor(OPTIONS * 8)
    grid = QuantGrid.for_weight(W, sym=False)
    res = solver_for(correlated_inputs(256, 40)).fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16), grid, bits)
    q, maxq = grid_codes(res.weight, W, bits)
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert torch.all(q.round() <= maxq) and torch.all(q.round() >= 0)
    assert torch.all(res.weight[res.mask] == 0)


def test_damping_retry_on_singular_hessian(capsys):
    x = torch.randn(4, 16)
    x = torch.cat([x, x], 1)  # duplicate channels and 4 samples: H is rank 4 of 32
    s = solver_for(x)
    logs = []
    factor = s.inverse_factor(0.0, log=logs.append)
    assert factor.percdamp > 0 and len(logs) >= 1 and "not positive definite" in logs[0]
    res = s.fasterprune(torch.randn(8, 32), SolveSettings(PruneSpec(sparsity=0.5), percdamp=0.0))
    assert torch.isfinite(res.weight).all()


def test_solve_order():
    h = torch.tensor([1.0, 5.0, 3.0, 4.0])
    assert solve_order(h, "stored") is None
    assert solve_order(h, "act").tolist() == [1, 3, 2, 0]
    with pytest.raises(ValueError):
        solve_order(h, "loudest")


def test_reordered_solve_keeps_grid_sparsity_and_column_identity():
    W = torch.randn(16, 48)
    x = correlated_inputs(512, 48)
    bits = torch.tensor([2, 3, 4, 6, 8, 4] * 8)
    s = solver_for(x)
    order = solve_order(s.xtx.diagonal(), "act")
    res = s.fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16), QuantGrid.for_weight(W, False), bits, order=order)
    q, maxq = grid_codes(res.weight, W, bits)
    assert torch.allclose(q, q.round(), atol=1e-3) and torch.all(q.round() <= maxq)
    assert int(res.mask.sum()) == 16 * 48 // 2 and torch.all(res.weight[res.mask] == 0)
    with pytest.raises(ValueError):
        s.fasterprune(W, SolveSettings(PruneSpec()), QuantGrid.for_weight(W, False, groupsize=16), bits, order=order)


def test_narrow_first_keeps_each_blocks_sparsity_and_each_nm_group():
    """Reordered within a block, a block keeps its columns: exactly half of each block's weights pruned
    (unstructured), 2 of every stored group of 4 (2:4), every weight on its own column's grid."""
    torch.manual_seed(0)
    X = correlated_inputs(2048, 64)
    W = torch.randn(32, 64)
    bits = torch.tensor([2, 6, 4, 3] * 16)
    s = solver_for(X)
    grid = QuantGrid.for_weight(W, False)
    order = solve_order(s.xtx.diagonal(), "narrow_first", bits, unit=16)
    assert sorted(order[:16].tolist()) == list(range(16)) and order[:16].tolist() != list(range(16))
    res = s.fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16, fused=False), grid, bits, order=order)
    assert [int(res.mask[:, i:i + 16].sum()) for i in range(0, 64, 16)] == [32 * 8] * 4
    stored = s.fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16, fused=False), grid, bits)
    assert not torch.equal(res.weight, stored.weight)
    q, maxq = grid_codes(res.weight, W, bits)
    assert torch.allclose(q, q.round(), atol=1e-3) and torch.all(q.round() <= maxq)
    nm_order = solve_order(s.xtx.diagonal(), "narrow_first", bits, unit=4)
    res = s.fasterprune(W, SolveSettings(PruneSpec(prunen=2, prunem=4), blocksize=16, fused=False), grid, bits, order=nm_order)
    assert (res.mask.view(32, 16, 4).sum(-1) == 2).all()


def test_dead_input_channels_are_zeroed():
    x = correlated_inputs(128, 16)
    x[:, 5] = 0
    res = solver_for(x).fasterprune(torch.randn(4, 16), SolveSettings(PruneSpec()), QuantGrid.for_weight(torch.randn(4, 16), False), torch.full((16,), 4))
    assert torch.all(res.weight[:, 5] == 0)


def test_magnitude_prune_exact():
    W = torch.randn(10, 20)
    P = magnitude_prune(W, PruneSpec(sparsity=0.3))
    assert int((P == 0).sum()) == 60
    assert P[P != 0].abs().min() >= W.abs().flatten().sort().values[60 - 1]
    P = magnitude_prune(W, PruneSpec(prunen=2, prunem=4))
    assert torch.all((P == 0).view(10, 5, 4).sum(2) == 2)


def test_round_to_nearest_matches_reference_formula():
    W = torch.randn(6, 10)
    xmin = torch.minimum(W.min(1).values, torch.zeros(6))
    xmax = torch.maximum(W.max(1).values, torch.zeros(6))
    scale = ((xmax - xmin) / 15)[:, None]
    zero = torch.round(-xmin[:, None] / scale)
    expect = scale * (torch.clamp(torch.round(W / scale) + zero, 0, 15) - zero)
    assert torch.equal(round_to_nearest(W, 4, sym=False), expect)


def test_one_width_rounding_matches_reference_formula_per_group_with_a_shrunk_range():
    torch.manual_seed(0)
    W = torch.randn(6, 10)
    for groupsize, shrink in ((-1, 1.0), (4, 0.7), (-1, 0.55)):  # 4 on 10 columns: a short last group
        expect = torch.empty_like(W)
        for g0 in range(0, 10, groupsize if groupsize > 0 else 10):
            w = W[:, g0:g0 + (groupsize if groupsize > 0 else 10)]
            xmin = torch.minimum(w.min(1).values, torch.zeros(6))[:, None] * shrink
            xmax = torch.maximum(w.max(1).values, torch.zeros(6))[:, None] * shrink
            scale = (xmax - xmin) / 7
            zero = torch.round(-xmin / scale)
            expect[:, g0:g0 + w.shape[1]] = scale * (torch.clamp(torch.round(w / scale) + zero, 0, 7) - zero)
        grid = QuantGrid.rounding(W, False, groupsize)
        assert torch.equal(grid.round_at(W, 3, shrink), expect)


def test_hessian_diagonal_without_forming_h():
    solver = SparseGPT(12)
    solver.add_batch(torch.randn(50, 12))
    assert torch.allclose(solver.hessian_diag, torch.diag(solver.hessian))


# ---------------------------------------------------------------- model loop


def test_compress_tiny_model_exact_sparsity_every_layer():
    model = tiny_model()
    stats = run_cfg(model, torch.randint(0, 64, (8, 64)), sparsity=0.5)
    assert len(stats) == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    for s in stats:
        assert s.nonzero == s.rows * s.columns // 2, s.name


def test_wbits_alone_runs_gptq():
    model = tiny_model()
    before = model.model.decoder.layers[0].fc1.weight.detach().clone()
    stats = run_cfg(model, torch.randint(0, 64, (8, 64)), wbits=4)
    after = model.model.decoder.layers[0].fc1.weight
    assert not torch.equal(before, after)
    assert len(torch.unique(after[0])) <= 16
    assert all(s.bits_per_column == [4] * s.columns for s in stats)


def loud_tiny_model() -> OPTForCausalLM:
    """tiny_model with weights large enough that each layer changes the residual stream, as trained ones do
    (at the initial scale a layer's output is nearly its input, which hides a layer fed the wrong input)."""
    model = tiny_model()
    with torch.no_grad():
        for linear in find_linears(model.model.decoder.layers).values():
            linear.weight.mul_(10)
    return model


def test_output_sensitivity_is_the_mean_squared_loss_gradient_of_each_output():
    model = loud_tiny_model()
    ids = torch.randint(0, 64, (6, 32))
    before = {n: p.clone() for n, p in model.named_parameters()}
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=4)
    fisher = output_sensitivity(model, ids, inputs, torch.device("cpu"))
    assert len(fisher) == 12 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # independently: autograd of the summed next-token loss w.r.t. layer 1's fc2 output, all windows at once
    outputs = []
    handle = model.model.decoder.layers[1].fc2.register_forward_hook(lambda m, x, y: outputs.append(y) or y.retain_grad())
    logits = model(ids).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    handle.remove()
    expected = (outputs[0].grad.reshape(-1, 32) ** 2).sum(0) / ids[:, 1:].numel()
    assert torch.allclose(fisher["model.decoder.layers.1.fc2"], expected, rtol=1e-4)
    assert fisher["model.decoder.layers.1.fc2"].shape == (32,) and fisher["model.decoder.layers.0.fc1"].shape == (64,)


def test_output_sensitivity_of_a_half_precision_model_runs_in_fp32_and_restores_the_weights():
    model = loud_tiny_model().half().float()  # the reference has the fp16 model's weights
    ids = torch.randint(0, 64, (6, 32))
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=3)
    reference = output_sensitivity(model, ids, inputs, torch.device("cpu"))
    model.half()
    before = {n: p.clone() for n, p in model.named_parameters()}
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=3)
    fisher = output_sensitivity(model, ids, inputs, torch.device("cpu"))
    assert all(p.dtype == torch.float16 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    for name, f in reference.items():  # only the layer-0 inputs are rounded to fp16
        assert fisher[name].dtype == torch.float32 and torch.allclose(fisher[name], f, rtol=0.02, atol=0)


def test_output_sensitivity_refuses_layers_away_from_the_device():
    """With --offload the layers live on the CPU while the run's device is the GPU (here: meta)."""
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 16))
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=2)
    with pytest.raises(RuntimeError, match="drop --offload"):
        output_sensitivity(model, ids, inputs, torch.device("meta"))


def test_resident_ignores_the_device_index():
    """The layers report "cuda:0" where the run asks for "cuda" (here: cpu vs cpu:0); both mean resident."""
    layers = tiny_model().model.decoder.layers
    assert resident(layers, torch.device("cpu")) and resident(layers, torch.device("cpu", 0))
    assert not resident(layers, torch.device("meta"))


def test_known_tiny_perplexity_uniform_logits():
    """Zero output embedding => uniform logits => perplexity equals the vocabulary size."""
    model = tiny_model(vocab=50)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = torch.randint(0, 50, (1, 64 * 3 + 5))
    assert abs(perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 2) - 50) < 1e-3


def test_perplexity_batching_does_not_change_result():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 64 * 5))
    a = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 1)
    b = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 4)
    assert abs(a - b) / a < 1e-5


def test_whole_model_and_layer_by_layer_evaluation_agree():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 64 * 5 + 7))
    a = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 2, whole_model=True)
    b = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 3, whole_model=False)
    assert abs(a - b) / a < 1e-4


def test_reference_filter_minlayer_prune_only():
    model = tiny_model()
    stats = run_cfg(model, torch.randint(0, 64, (4, 64)), sparsity=0.5, minlayer=1, prune_only="fc")
    assert [s.name for s in stats] == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    assert not torch.any(model.model.decoder.layers[0].fc1.weight == 0)


# ---------------------------------------------------------------- CLI end to end


def cli(tiny_dir, tmp_path, *flags) -> tuple[int, dict]:
    model, data = tiny_dir
    out = tmp_path / "r.json"
    code = oe.main([str(model), "c4", "--data_dir", str(data), "--nsamples", "4", "--seqlen", "64", "--quiet",
                    "--device", "cpu", "--results_json", str(out), *flags])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_cli_dense_is_bit_identical(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--save", str(tmp_path / "saved"))
    assert code == 0 and res["summary"] is None
    a = OPTForCausalLM.from_pretrained(tiny_dir[0]).state_dict()
    b = OPTForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(res["perplexity"]) == {"wikitext2", "ptb", "c4"}


def test_cli_mixed_run_reports_statistics(tiny_dir, tmp_path, capsys):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.0",
                    "--bit_method", "budget")
    assert code == 0
    s = res["summary"]
    assert s["channels"] == 2 * (5 * 32 + 64)
    assert abs(s["stored_bits"] - 3.0) <= 0.02  # the target counts stored (kept) weights
    assert s["effective_bits"] > s["stored_bits"] / 2  # codes of half the weights, plus ranges, mask and bit map
    assert all(math.isfinite(v) for v in res["perplexity"].values())
    assert res["bit_scope"] == "model"  # the layers are on the device
    assert res["solve_order"] == "stored" and res["config"]["solve_order"] == "auto"
    assert res["config"]["error_shrinkage"] is None  # as asked; what ran is recorded beside it
    assert res["mixed_precision"]["error_shrinkage"] == precision.ERROR_SHRINKAGE["budget"]
    assert res["mixed_precision"]["method"] == "budget" and res["mixed_precision"]["target"] == 3.0


def test_cli_budget_at_4_bits_with_sparsity_stores_only_the_widths_next_to_the_target(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0",
                    "--bit_method", "budget")
    assert code == 0
    widths = {b for layer in res["layers"] for b in layer["bits_per_column"] or ()}
    assert widths <= {3, 4, 6} and len(widths) > 1
    assert abs(res["summary"]["stored_bits"] - 4.0) <= 0.02
    assert res["mixed_precision"]["options"] == [3, 4, 6] and res["config"]["bit_options"] is None
    assert res["bit_scope"] == "model" and res["config"]["bit_scope"] == "auto"  # auto resolved as the layers fit


def test_cli_budget_in_layer_scope_keeps_every_width(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0",
                    "--bit_method", "budget", "--bit_scope", "layer")
    assert code == 0 and res["mixed_precision"]["options"] == [2, 3, 4, 6, 8] and res["bit_scope"] == "layer"


def test_cli_guard_target_without_wbits(tiny_dir, tmp_path, capsys):
    code, res = cli(tiny_dir, tmp_path, "--target_avg_bits", "4.0")
    assert code == 2 and res == {}
    assert "--wbits 4" in capsys.readouterr().err


BAD_INPUTS = [
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--prunen", "2"], "give both --prunen and --prunem"),
    (["--prunen", "4", "--prunem", "4"], "must be below --prunem"),
    (["--wbits", "5"], "not among --bit_options"),
    (["--target_avg_bits", "4.0"], "add --wbits 4"),
    (["--wbits", "4", "--target_avg_bits", "9"], "outside [2, 8]"),
    (["--wbits", "4", "--target_avg_bits", "1.5"], "outside [2, 8]"),
    (["--wbits", "4", "--bit_options", "4,4,8"], "distinct widths"),
    (["--wbits", "4", "--importance_weights", "1,1"], "five non-negative numbers"),
    (["--wbits", "4", "--importance_weights", "0,0,0,0,0"], "five non-negative numbers"),
    (["--gmp", "--sparsity", "0.5", "--wbits", "4"], "add --nearest"),
    (["--nearest", "--sparsity", "0.5", "--wbits", "4"], "add --gmp"),
    (["--eval", "wikitext2,lambada"], "unknown dataset"),
    (["--seqlen", "4096"], "exceeds the model's 128 positions"),
    (["--wbits", "4", "--act-order", "--groupsize", "16"], "--act-order works with"),
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_scope", "model", "--offload"], "drop --offload"),
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_granularity", "linear", "--offload"], "drop --offload"),
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_granularity", "linear", "--bit_scope", "layer"],
     "drop --bit_scope layer"),
]


@pytest.mark.parametrize("flags,message", BAD_INPUTS)
def test_bad_flags_fail_fast_with_the_fix(tiny_dir, tmp_path, capsys, flags, message):
    code, res = cli(tiny_dir, tmp_path, *flags)
    assert code == 2 and res == {}
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("flags", [["--bit_options", "2,x"], ["--importance_weights", "a,b"]])
def test_malformed_lists_are_argparse_errors(tiny_dir, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        cli(tiny_dir, tmp_path, *flags)
    assert e.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err


def test_unknown_calibration_dataset(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        oe.main([str(tiny_dir[0]), "lambada"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    code = oe.main([str(tmp_path / "nope"), "c4", "--results_json", str(tmp_path / "r.json")])
    assert code == 2 and "model directory not found" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_missing_offline_file_names_file_and_flag(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data)
    (data / "ptb" / "ptb.test.txt").unlink()
    code = oe.main([str(tiny_dir[0]), "c4", "--data_dir", str(data), "--seqlen", "64", "--nsamples", "4",
                    "--device", "cpu", "--results_json", str(tmp_path / "r.json"), "--save", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "ptb.test.txt" in err and "--data_dir" in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "s").exists()


def test_data_errors_come_before_model_errors(tiny_dir, tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_dir[0].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "model.safetensors").write_bytes(b"not weights")  # loading it (on the thread) fails
    data = tmp_path / "data"
    write_data(data)
    (data / "ptb" / "ptb.test.txt").unlink()  # found missing before the load starts
    code = oe.main([str(model), "c4", "--data_dir", str(data), "--seqlen", "64", "--device", "cpu"])
    assert code == 2 and "ptb.test.txt" in capsys.readouterr().err
    write_data(tmp_path / "short", words=20)  # found too short while tokenizing, as the load fails beside it
    code = oe.main([str(model), "ptb", "--data_dir", str(tmp_path / "short"), "--nsamples", "4", "--device", "cpu"])
    assert code == 2 and "tokens" in capsys.readouterr().err


def test_background_returns_the_value_or_raises_the_error():
    assert Background(lambda: 42).result() == 42
    with pytest.raises(ZeroDivisionError):
        Background(lambda: 1 / 0).result()


def test_too_little_text(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data, words=20)
    code = oe.main([str(tiny_dir[0]), "ptb", "--data_dir", str(data), "--nsamples", "4", "--device", "cpu"])
    assert code == 2 and "tokens" in capsys.readouterr().err


def test_save_into_non_empty_directory(tiny_dir, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    code, res = cli(tiny_dir, tmp_path, "--save", str(tmp_path / "s"))
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"] and res == {}


def test_save_reload_gives_same_perplexity(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.5",
                    "--save", str(tmp_path / "s"))
    assert code == 0
    (tmp_path / "again").mkdir()
    code2, res2 = cli((tmp_path / "s", tiny_dir[1]), tmp_path / "again")
    assert code2 == 0 and res2["perplexity"] == res["perplexity"]
    saved = json.loads((tmp_path / "s" / "compression.json").read_text())
    assert saved["summary"]["channels"] == res["summary"]["channels"]


def test_export_reloads_to_the_same_perplexity(tiny_dir, tmp_path):
    from formats.packed import load_compressed
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.5",
                    "--bit_method", "budget", "--export", str(tmp_path / "packed"), "--save", str(tmp_path / "s"))
    assert code == 0 and res["export"]["layers"] == 12
    files = list((tmp_path / "packed").iterdir())  # the tokenizer is published with the rest, and counted
    assert (tmp_path / "packed" / "tokenizer_config.json") in files
    assert res["export"]["total_bytes"] == sum(f.stat().st_size for f in files)
    packed = load_compressed(str(tmp_path / "packed")).state_dict()
    saved = OPTForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    assert packed.keys() == saved.keys() and all(torch.equal(packed[k], saved[k]) for k in saved)


def test_export_without_quantization_is_refused(tiny_dir, tmp_path, capsys):
    code, _ = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--export", str(tmp_path / "p"))
    assert code == 2 and "add --wbits" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_nan_weight_is_reported_with_layer_name(tiny_dir, tmp_path, capsys):
    model = OPTForCausalLM.from_pretrained(tiny_dir[0])
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / "m" / f).write_bytes((tiny_dir[0] / f).read_bytes())
    code, _ = cli((tmp_path / "m", tiny_dir[1]), tmp_path, "--sparsity", "0.5")
    assert code == 1 and "layers.1.fc1" in capsys.readouterr().err


def test_same_command_twice_is_bit_identical(tiny_dir, tmp_path):
    flags = ["--sparsity", "0.5", "--wbits", "3", "--target_avg_bits", "3.0", "--bit_method", "budget"]
    _, a = cli(tiny_dir, tmp_path, *flags)
    _, b = cli(tiny_dir, tmp_path, *flags)
    assert a["perplexity"] == b["perplexity"] and a["layers"][3]["bits_per_column"] == b["layers"][3]["bits_per_column"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hessian_from_16bit_activations_on_gpu_is_the_fp32_hessian():
    x = (correlated_inputs(4096, 256) / 4).half().cuda()
    fast, slow = SparseGPT(256, "cuda"), SparseGPT(256, "cuda")
    for chunk in x.split(1024):
        fast.add_batch(chunk)
        slow.add_batch(chunk.float())
    assert torch.allclose(fast.hessian, slow.hessian, rtol=1e-5, atol=1e-5 * slow.hessian.abs().max().item())
    assert torch.equal(fast.peak, slow.peak)


def test_plot_writes_a_png(tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    code, _ = cli(tiny_dir, tmp_path, "--wbits", "4", "--target_avg_bits", "3.5", "--plot", str(tmp_path / "b.png"))
    assert code == 0 and (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_script_runs_and_checks_targets(tiny_dir, tmp_path):
    import subprocess
    env = dict(os.environ, MODEL=str(tiny_dir[0]), DATA_DIR=str(tiny_dir[1]), OUT=str(tmp_path),
               EXTRA="--nsamples 4 --seqlen 64 --device cpu --eval ptb")
    done = subprocess.run(["bash", str(Path(__file__).parent / "run_comparison_test_fixed.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| budget-4.0 " in done.stdout and "stored averages within 0.02 of their targets" in done.stdout
    assert "nominal b | stored b | effective b" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(abs(r["summary"]["stored_bits"] - r["config"]["target_avg_bits"]) <= 0.02
               for r in results.values() if r["config"]["target_avg_bits"] is not None)
    assert len(results) == 9 and all(r["summary"]["channels"] == 2 * (5 * 32 + 64) for r in results.values())


def test_cli_defaults_are_run_config_defaults(monkeypatch):
    """One source of defaults: the flags given nothing produce RunConfig's own defaults."""
    monkeypatch.delenv("OPT_ENHANCED_CACHE", raising=False)
    assert oe.parse_args(["m", "c4"]) == RunConfig("m", "c4")
