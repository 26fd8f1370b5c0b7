"""Mixed precision (bitalloc.py): metrics, the error model, clipping, the allocators and the stored-bit target."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import OPTForCausalLM

import conftest
import opt_enhanced as oe
import pipeline.compress
from mixed import bitalloc, costs, precision
from mixed.bitalloc import allocate_budget, allocate_quantile
from mixed.costs import channel_metrics, combine_metrics
from mixed.rounding import rounding_model
from mixed.stats import summarize
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig, UsageError
from pipeline.model_scope import allocation_scope
from quant import QuantGrid
from sparsegpt_enhanced import PruneSpec, SolveSettings, SparseGPT
from systems.progress import Log

OPTIONS = [2, 3, 4, 6, 8]


def tiny_model(layers: int = 2, hidden: int = 32, ffn: int = 64) -> OPTForCausalLM:
    """conftest's tiny OPT with three loud input channels, as in trained models, so that importance varies."""
    model = conftest.tiny_model(layers, hidden, ffn)
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn_layer_norm.weight[:3] *= 30
    return model


def solver_for(x: torch.Tensor) -> SparseGPT:
    s = SparseGPT(x.shape[1])
    s.add_batch(x)
    return s


def min_max_error(imp: torch.Tensor) -> torch.Tensor:
    """importance / (2^b - 1)^2 at each of OPTIONS: the error model of a min-max grid."""
    return imp[:, None].double() * (2.0 ** torch.tensor(OPTIONS, dtype=torch.float64) - 1) ** -2


class MaskRecorder:
    """Records the mask and widths of the solve that gives each Linear its weights (the solver's output, not
    the statistics'): the last solve inside each compress_linear, after the clip search's solves of sampled rows."""

    def __init__(self, monkeypatch) -> None:
        self.solves: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        solve, compress_linear = SparseGPT.fasterprune, pipeline.compress.compress_linear

        def recording(solver, weight, prune, grid=None, bits_per_column=None, *args, **kw):
            result = solve(solver, weight, prune, grid, bits_per_column, *args, **kw)
            pending.append((result.mask.clone(), bits_per_column.clone()))
            return result

        def linear(*args, **kw):
            pending.clear()
            out = compress_linear(*args, **kw)
            self.solves.append(pending[-1])
            return out

        monkeypatch.setattr(SparseGPT, "fasterprune", recording)
        monkeypatch.setattr(pipeline.compress, "compress_linear", linear)

    def stored_average(self) -> float:
        bits = sum(int(((~m).sum(0) * b).sum()) for m, b in self.solves)
        return bits / sum(int((~m).sum()) for m, _ in self.solves)


def compress_tiny(model, **kw) -> list:
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=8, blocksize=16, **kw)
    validate(cfg)
    calib = torch.randint(0, 64, (8, 64), generator=torch.Generator().manual_seed(1))
    return compress(model, calib, cfg, torch.device("cpu"), Log(True)).stats


# ---------------------------------------------------------------- metrics


def test_each_metric_is_its_documented_formula_in_order():
    torch.manual_seed(0)
    x = torch.randn(200, 10) * torch.linspace(0.5, 3, 10)
    x[7, 3] = 40.0  # one outlier
    W, Q = torch.randn(6, 10), torch.randn(6, 10)
    H = 2 / 200 * x.T @ x
    Hinv = torch.linalg.inv(H)
    got = channel_metrics(W, torch.diag(H), x.abs().amax(0), torch.diag(Hinv), Q)
    rms = x.pow(2).mean(0).sqrt()
    expected = [rms, x.abs().amax(0) / rms, W.norm(dim=0), (W ** 2).sum(0) / torch.diag(Hinv),
                torch.diag(H) * ((W - Q) ** 2).sum(0)]
    assert costs.METRICS == ("energy", "outlier", "weight", "obs", "sensitivity")
    for k, e in enumerate(expected):
        assert torch.allclose(got[k], e, rtol=1e-4), costs.METRICS[k]


def test_one_hot_importance_weights_give_exactly_that_metric():
    metrics = torch.rand(5, 40) * torch.tensor([1.0, 10, 100, 1000, 1e4])[:, None]
    for k in range(5):
        weights = tuple(1.0 if i == k else 0.0 for i in range(5))
        assert torch.allclose(combine_metrics(metrics, weights), metrics[k] / metrics[k].mean())
    both = combine_metrics(metrics, (1.0, 0, 0, 0, 3.0))
    assert torch.allclose(both, (metrics[0] / metrics[0].mean() + 3 * metrics[4] / metrics[4].mean()) / 4)


# ---------------------------------------------------------------- the error model and clipping


def test_rounding_model_is_the_solvers_loss_for_the_last_column():
    torch.manual_seed(0)
    solver = solver_for(torch.randn(256, 16))
    W = torch.randn(8, 16)
    model = rounding_model(solver, W, SolveSettings(PruneSpec(), sym=False, groupsize=-1))
    error = torch.stack([model.loss(b) for b in OPTIONS], 1)
    assert torch.all(error[:, :-1] > error[:, 1:])
    # the last column is solved after every other one: what it loses is its own rounding error over U_jj^2
    U = solver.inverse_factor(0.01).upper
    Q = QuantGrid.rounding(W, False).round(W, torch.full((16,), 2))
    assert torch.allclose(error[-1, 0], ((W[:, -1] - Q[:, -1]) ** 2).sum() / U[-1, -1] ** 2)


def test_rounding_model_row_weight_weighs_each_rows_loss():
    torch.manual_seed(0)
    solver = solver_for(torch.randn(256, 16))
    W = torch.randn(6, 16)
    r = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 1.0])
    per_row = [rounding_model(solver, W[i:i + 1], SolveSettings(PruneSpec(), sym=False, groupsize=-1)).loss(3) for i in range(6)]
    weighted = rounding_model(solver, W, SolveSettings(PruneSpec(), sym=False, groupsize=-1), row_weight=r).loss(3)
    assert torch.allclose(weighted, sum(ri * e for ri, e in zip(r, per_row)), rtol=1e-5)


def test_sensitivity_shrinkage_moves_each_rows_weight_toward_its_linears_mean():
    """The error model is linear in the row weights (clipping off): shrinking them by h toward their mean gives
    (1 - h) x the costs at the measured weights + h x the costs at the mean weight on every row."""
    torch.manual_seed(0)
    solver = solver_for(torch.randn(256, 16) * torch.linspace(0.2, 3, 16))
    W = torch.randn(6, 16)
    r = torch.tensor([0.1, 1.0, 4.0, 0.5, 9.0, 1.0])
    mp = lambda h: precision.MixedPrecision(3.0, clip=False, sensitivity_shrinkage=h)
    cost = lambda weights, h: costs.channel_costs(W, solver, SolveSettings(blocksize=16), 3, mp(h), weights).cost
    measured, flat = cost(r, 0.0), cost(torch.full_like(r, float(r.mean())), 0.0)
    assert not torch.allclose(measured, flat, rtol=1e-3)
    assert torch.allclose(cost(r, 1.0), flat, rtol=1e-5)
    assert torch.allclose(cost(r, 0.25), 0.75 * measured + 0.25 * flat, rtol=1e-5)


def test_per_weight_shrinkage_keeps_each_channels_stored_count():
    """--shrinkage_mean per_weight: fully shrunk, every channel's error per stored weight is its Linear's (total
    error over total stored weights); without sparsity every column stores all rows, and it is per_channel."""
    torch.manual_seed(0)
    solver = solver_for(torch.randn(256, 32) * torch.linspace(0.2, 3, 32))
    W = torch.randn(24, 32)
    mp = lambda mean, h: precision.MixedPrecision(3.0, clip=False, error_shrinkage=h, shrinkage_mean=mean)
    priced = lambda prune, mean, h: costs.channel_costs(W, solver, SolveSettings(prune, blocksize=16), 3, mp(mean, h))
    for h in (0.0, 0.5, 1.0):
        assert torch.allclose(priced(PruneSpec(), "per_weight", h).cost, priced(PruneSpec(), "per_channel", h).cost)
    sparse = PruneSpec(sparsity=0.5)
    raw, full = priced(sparse, "per_weight", 0.0), priced(sparse, "per_weight", 1.0)
    assert not torch.equal(raw.size, torch.full_like(raw.size, raw.size.mean()))  # stored counts differ
    per_weight = full.cost / full.importance[:, None] / full.size[:, None]
    linear = (raw.cost / raw.importance[:, None]).sum(0) / raw.size.sum()
    assert torch.allclose(per_weight, linear.expand_as(per_weight), rtol=1e-4)


def test_channel_cost_is_the_solvers_loss_alone_or_weighted_by_importance():
    torch.manual_seed(0)
    solver = solver_for(torch.randn(256, 16) * torch.linspace(0.2, 3, 16))
    W = torch.randn(8, 16)
    mp = lambda cost: precision.MixedPrecision(3.0, clip=False, error_shrinkage=0.0, channel_cost=cost)
    priced = lambda cost: costs.channel_costs(W, solver, SolveSettings(blocksize=16), 3, mp(cost))
    loss = rounding_model(solver, W, SolveSettings(PruneSpec(), sym=False, groupsize=-1, blocksize=16)).loss
    expected = torch.stack([loss(b) for b in OPTIONS], 1)
    assert torch.allclose(priced("error").cost, expected, rtol=1e-5)
    weighted = priced("weighted")
    assert torch.allclose(weighted.cost, weighted.importance[:, None] * expected, rtol=1e-5)


def test_error_shrinkage_defaults_to_the_allocators_own_and_the_flag_overrides_it():
    args = ["model", "c4", "--wbits", "4", "--target_avg_bits", "4", "--bit_method"]
    for method in ("quantile", "budget"):
        assert oe.parse_args(args + [method]).mixed_precision.error_shrinkage == precision.ERROR_SHRINKAGE[method]
        assert oe.parse_args(args + [method, "--error_shrinkage", "0.1"]).mixed_precision.error_shrinkage == 0.1
    assert precision.ERROR_SHRINKAGE["quantile"] != precision.ERROR_SHRINKAGE["budget"]


def test_budget_with_sparsity_at_4_bits_chooses_among_the_widths_next_to_the_target():
    """The default widths (precision.default_options), against the rule written out: all of 2,3,4,6,8, except budget
    per channel in model scope with sparsity at a target of 4 or more, which keeps the widths bracketing the target
    and one more either side; --bit_options overrides."""
    args = lambda *flags: oe.parse_args(["model", "c4", "--wbits", "4", *flags])
    mixed = lambda method, target, *flags: args("--target_avg_bits", str(target), "--bit_method", method, *flags)
    model = ("--bit_scope", "model")
    assert mixed("budget", 4.0, "--sparsity", "0.5", *model).mixed_precision.options == (3, 4, 6)
    assert mixed("budget", 4.0, "--prunen", "2", "--prunem", "4", *model).mixed_precision.options == (3, 4, 6)
    assert mixed("budget", 5.0, "--sparsity", "0.5", *model).mixed_precision.options == (3, 4, 6, 8)
    assert mixed("budget", 6.0, "--sparsity", "0.5", *model).mixed_precision.options == (4, 6, 8)
    everything = (2, 3, 4, 6, 8)
    for run in (mixed("budget", 3.5, "--sparsity", "0.5", *model), mixed("budget", 4.0, *model),
                mixed("quantile", 4.0, "--sparsity", "0.5", *model),
                mixed("budget", 4.0, "--sparsity", "0.5", "--bit_scope", "layer"),
                mixed("budget", 4.0, "--sparsity", "0.5", "--bit_granularity", "linear", *model)):
        assert run.mixed_precision.options == everything
    assert mixed("budget", 4.0, "--sparsity", "0.5", *model, "--bit_options", "2,4,8").mixed_precision.options == \
        (2, 4, 8)
    assert oe.parse_args(["model", "c4", "--wbits", "2", "--target_avg_bits", "4", "--bit_method", "budget", *model,
                          "--sparsity", "0.5"]).mixed_precision.options == (2, 3, 4, 6)  # the base width stays
    assert args("--sparsity", "0.5").allowed_widths == list(everything)  # uniform runs: as before


def test_predicted_kept_counts_match_the_solvers_mask_where_it_is_chosen_first():
    torch.manual_seed(0)
    solver = solver_for(torch.randn(512, 48) * torch.linspace(0.2, 4, 48))
    W = torch.randn(24, 48)
    # unstructured masks are chosen per block, N:M per group: the first one is chosen before any update
    for prune, first in ((PruneSpec(sparsity=0.5), 16), (PruneSpec(prunen=2, prunem=4), 4)):
        predicted = rounding_model(solver, W, SolveSettings(prune, sym=False, groupsize=-1, blocksize=16)).kept_per_column()
        mask = solver.fasterprune(W, SolveSettings(prune, blocksize=16, fused=False)).mask
        assert torch.equal(predicted[:first], (~mask[:, :first]).sum(0))
        assert not torch.equal(predicted, (~mask).sum(0))  # later ones drift: what the run corrects for
        for i in range(0, 48, first):  # every block (group) keeps exactly what the solver keeps
            assert predicted[i:i + first].sum() == (~mask[:, i:i + first]).sum()


def test_clip_ranges_take_the_factor_with_the_least_estimated_loss():
    torch.manual_seed(0)
    solver = solver_for(torch.randn(256, 32))
    W = torch.randn(16, 32)
    W[0, 0] = 12.0  # one extreme weight stretches row 0's range
    model = rounding_model(solver, W, SolveSettings(PruneSpec(), sym=False, groupsize=-1))
    shrink = costs.clip_ranges(model, [2, 8], precision.CLIP_FACTORS)
    for b in (2, 8):
        losses = {f: model.loss(b, f).sum().item() for f in precision.CLIP_FACTORS}
        assert losses[shrink.get(b, 1.0)] == min(losses.values())
    assert shrink[2] < 1.0  # at 2 bits the min-max range is not the best


def test_clipped_grid_keeps_pruned_weights_zero_and_values_on_the_shrunk_grid():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    W = torch.randn(16, 32)
    shrink = {2: 0.6, 3: 0.8}
    for sym in (False, True):
        grid = QuantGrid.for_weight(W, sym, -1, shrink)
        bits = torch.tensor([2, 3, 4, 8] * 8)
        result = solver_for(x).fasterprune(W, SolveSettings(PruneSpec(sparsity=0.5), blocksize=16, fused=False), grid, bits)
        assert torch.all(result.weight[result.mask] == 0)
        assert int(result.mask.sum()) == 16 * 32 // 2
        plain = QuantGrid.for_weight(W, sym, -1)
        for j, b in enumerate(bits.tolist()):
            f = shrink.get(b, 1.0)
            scale = (plain.xmax[:, 0] - plain.xmin[:, 0]) * f / (2 ** b - 1)
            zero = torch.full_like(scale, 2 ** (b - 1)) if sym else torch.round(-plain.xmin[:, 0] * f / scale)
            code = result.weight[:, j] / scale + zero
            assert torch.allclose(code, code.round(), atol=1e-3), (sym, j)
            assert code.min() >= -1e-3 and code.max() <= 2 ** b - 1 + 1e-3


# ---------------------------------------------------------------- allocators


def test_monotone_tiers_is_the_best_monotone_allocation():
    torch.manual_seed(0)
    for _ in range(30):
        cost = torch.rand(7, 3, dtype=torch.float64)
        tier = bitalloc.monotone_tiers(cost)
        best = min(sum(cost[j, t[j]].item() for j in range(7))
                   for t in itertools.product(range(3), repeat=7) if list(t) == sorted(t))
        assert (tier.diff() >= 0).all()
        assert math.isclose(sum(cost[j, tier[j]].item() for j in range(7)), best, rel_tol=1e-12)


@pytest.mark.parametrize("target", [2.5, 3.0, 3.5, 4.0, 5.0, 7.5])
def test_quantile_is_monotone_in_importance_and_spends_the_stored_target(target):
    torch.manual_seed(0)
    imp = torch.rand(384) ** 4
    size = torch.randint(10, 100, (384,)).double()  # kept weights per channel differ with sparsity
    bits = allocate_quantile(imp, min_max_error(imp), size, OPTIONS, target)
    assert set(bits.tolist()) <= set(OPTIONS)
    order = torch.argsort(imp)
    assert torch.all(bits[order].diff() >= 0)  # more important channels never get fewer bits
    spent = (bits.double() * size).sum().item() / size.sum().item()
    assert target - 0.02 <= spent <= target + 1e-9  # counted by stored weights, not by channels


def test_quantile_beats_uniform_and_no_boundary_move_that_fits_would_lower_its_cost():
    torch.manual_seed(0)
    for _ in range(20):
        imp = torch.rand(40)
        cost = min_max_error(imp) * torch.rand(40, 1)
        size = torch.randint(1, 6, (40,)).double()
        bits = allocate_quantile(imp, cost, size, OPTIONS, 3.0)
        tier = torch.searchsorted(torch.tensor(OPTIONS), bits)
        total = lambda t: cost[torch.arange(40), t].sum().item()
        assert total(tier) <= total(torch.full((40,), OPTIONS.index(3))) + 1e-15  # uniform is a candidate
        left = 3.0 * size.sum().item() - (bits.double() * size).sum().item()
        assert left >= -1e-9
        order = torch.argsort(imp, stable=True)
        for k in range(40):  # move channel order[k] one tier up, if the ranking stays monotone and it fits
            j = order[k]
            if tier[j] + 1 < len(OPTIONS) and (k + 1 == 40 or tier[order[k + 1]] > tier[j]):
                moved = tier.clone()
                moved[j] += 1
                if (OPTIONS[tier[j] + 1] - OPTIONS[tier[j]]) * size[j] <= left:
                    assert total(moved) >= total(tier) - 1e-15


def test_quantile_tiers_may_be_empty():
    imp = torch.arange(100.0)
    cost = torch.zeros(100, 5, dtype=torch.float64)
    cost[:, 0] = 1.0  # 2 bits cost something, every wider width nothing: no channel needs 4, 6 or 8
    bits = allocate_quantile(imp, cost, torch.ones(100), OPTIONS, 3.0)
    assert set(bits.tolist()) == {3}


@pytest.mark.parametrize("target", [2.5, 3.0, 4.0, 5.5])
def test_budget_spends_target_within_one_channel(target):
    imp = torch.rand(300) ** 6
    size = torch.randint(1, 5, (300,)).double()
    bits = allocate_budget(min_max_error(imp), size, OPTIONS, target)
    assert set(bits.tolist()) <= set(OPTIONS)
    spent = (bits.double() * size).sum().item()
    assert 0 <= target * size.sum().item() - spent <= 2 * size.max().item() + 1e-6
    assert bits[imp.argmax()] >= bits[imp.argmin()]


def test_budget_gives_bits_to_important_channels():
    imp = torch.ones(100)
    imp[:5] = 1e4
    bits = allocate_budget(min_max_error(imp), torch.ones(100), OPTIONS, 4.0)
    assert torch.all(bits[:5] > 4) and abs(bits.float().mean().item() - 4.0) <= 0.02


def test_budget_never_takes_a_later_step_of_a_channel_whose_earlier_step_did_not_fit():
    """One channel, 10 weights, whose hull goes 2 -> 6 (40 bits) then 6 -> 8 (20 bits), with 25 bits to spend: the
    second step fits the money left but starts at 6 bits, where the channel never got, so it stays at 2."""
    error = torch.tensor([[100.0, 99.0, 98.0, 10.0, 0.0]])
    assert allocate_budget(error, torch.tensor([10.0]), OPTIONS, 2.0 + 25 / 10).tolist() == [2]
    assert allocate_budget(error, torch.tensor([10.0]), OPTIONS, 2.0 + 45 / 10).tolist() == [6]


def test_budget_skips_widths_off_the_convex_hull():
    # channel 0: 3 bits buy nothing over 2, 4 bits buy everything; a step-by-step greedy would never get there
    error = torch.tensor([[8.0, 8.0, 0.0, 0.0, 0.0], [4.0, 2.0, 1.0, 0.5, 0.25]])
    assert allocate_budget(error, torch.ones(2), OPTIONS, 3.0).tolist() == [4, 2]
    assert allocate_budget(error, torch.ones(2), OPTIONS, 2.0).tolist() == [2, 2]


# ---------------------------------------------------------------- the stored-bit target in a run


@pytest.mark.parametrize("scope", ["model", "layer"])
@pytest.mark.parametrize("method", ["quantile", "budget"])
@pytest.mark.parametrize("flags", [dict(sparsity=0.5), dict(prunen=2, prunem=4), dict(sparsity=0.5, groupsize=16),
                                   dict()], ids=["unstructured", "2:4", "groups", "dense"])
def test_stored_average_is_on_target(monkeypatch, method, flags, scope):
    recorder = MaskRecorder(monkeypatch)
    stats = compress_tiny(tiny_model(), wbits=3, target_avg_bits=3.0, bit_method=method, bit_scope=scope, **flags)
    assert abs(recorder.stored_average() - 3.0) <= 0.02
    assert abs(summarize(stats).stored_bits - recorder.stored_average()) < 1e-12
    assert any(len(set(s.bits_per_column)) > 1 for s in stats)  # really mixed


def test_model_scope_meets_the_stored_target_across_linears(monkeypatch):
    recorder = MaskRecorder(monkeypatch)
    stats = compress_tiny(tiny_model(), sparsity=0.5, wbits=4, target_avg_bits=3.0, bit_method="budget")
    assert abs(recorder.stored_average() - 3.0) <= 0.02
    assert len({round(s.code_bits / s.kept, 2) for s in stats}) > 3  # Linears get different shares of one budget
    layer = compress_tiny(tiny_model(), sparsity=0.5, wbits=4, target_avg_bits=3.0, bit_method="budget",
                          bit_scope="layer")
    assert all(abs(s.code_bits / s.kept - 3.0) < 0.05 for s in layer[1:])  # each Linear on target (drift aside)


@pytest.mark.parametrize("scope, granularity, run_device, expected", [
    ("auto", "channel", "cpu", "model"), ("auto", "channel", "cuda", "layer"), ("auto", "linear", "cuda", "model"),
    ("layer", "channel", "cpu", "layer"), ("model", "channel", "cuda", "model")])
def test_auto_scope_is_model_unless_the_layers_are_offloaded(scope, granularity, run_device, expected):
    """The layers stay on the CPU: with the run device "cuda" that is an offloaded model (no GPU needed to ask)."""
    cfg = RunConfig(model="tiny", dataset="c4", wbits=4, target_avg_bits=3.5, bit_scope=scope,
                       bit_granularity=granularity)
    assert allocation_scope(cfg, tiny_model(), torch.device(run_device)) == expected


def test_linear_granularity_gives_one_width_per_linear_with_qkv_tied(monkeypatch):
    recorder = MaskRecorder(monkeypatch)
    stats = compress_tiny(tiny_model(), sparsity=0.5, wbits=4, target_avg_bits=3.5, bit_method="budget",
                          bit_scope="model", bit_granularity="linear")
    widths = {s.name: set(s.bits_per_column) for s in stats}
    assert all(len(w) == 1 for w in widths.values())
    for i in range(2):
        qkv = [widths[f"model.decoder.layers.{i}.self_attn.{p}_proj"] for p in "qkv"]
        assert qkv[0] == qkv[1] == qkv[2]
    assert len(set.union(*widths.values())) > 1
    assert recorder.stored_average() <= 3.5 + 1e-9


def test_uniform_runs_keep_the_reference_grid_unless_clip_is_asked():
    plain = tiny_model()
    compress_tiny(plain, sparsity=0.5, wbits=3)
    reference = tiny_model()
    compress_tiny(reference, sparsity=0.5, wbits=3, clip="none")
    clipped = tiny_model()
    compress_tiny(clipped, sparsity=0.5, wbits=3, clip="width")
    w = lambda m: torch.cat([p.flatten() for p in m.parameters()])
    assert torch.equal(w(plain), w(reference))
    assert not torch.equal(w(plain), w(clipped))


def test_stored_bit_drift_is_carried_into_the_next_linears_budget():
    budget = bitalloc.StoredBits(carry_drift=True)
    assert budget.linear_target(300.0, 100) == 3.0
    budget.spent(300.0, 290)  # the solver's mask kept fewer weights in wide columns than predicted
    assert budget.linear_target(300.0, 100) == 3.1
    budget.spent(310.0, 320)
    assert budget.linear_target(300.0, 100) == 3.0
    off = bitalloc.StoredBits(carry_drift=False)
    off.spent(300.0, 290)
    assert off.linear_target(300.0, 100) == 3.0


def test_mask_drift_is_reported_and_zero_without_sparsity(monkeypatch):
    """Without sparsity every weight is stored, so the allocator's prediction is exact; with 2:4 the solver's
    mask differs per column from the prediction, and the summary says by how much."""
    dense = summarize(compress_tiny(tiny_model(), wbits=3, target_avg_bits=3.0, bit_method="budget"))
    assert dense.mask_drift_bits == 0.0
    recorder = MaskRecorder(monkeypatch)
    nm = summarize(compress_tiny(tiny_model(), prunen=2, prunem=4, wbits=3, target_avg_bits=3.5,
                                 bit_method="budget"))  # between two widths: many columns of each, so drift shows
    assert nm.mask_drift_bits != 0.0 and abs(recorder.stored_average() - 3.5) <= 0.02
    assert summarize(compress_tiny(tiny_model(), prunen=2, prunem=4, wbits=3)).mask_drift_bits is None  # uniform


# ---------------------------------------------------------------- solve order and clip range defaults


def test_act_order_with_mixed_widths_solves_a_coarse_channel_before_a_fine_one_of_the_same_energy():
    from sparsegpt_enhanced import solve_order
    energy = torch.tensor([1.0, 8.0, 8.0, 2.0, 64.0])
    assert solve_order(energy, "stored") is None
    assert solve_order(energy, "act").tolist() == [4, 1, 2, 3, 0]
    assert solve_order(energy, "act", torch.full((5,), 3)).tolist() == [4, 1, 2, 3, 0]  # one width: act order
    # keys H_jj 4^-b: 1/16, 8/256, 8/16, 2/16, 64/4096: the loud 2-bit channel first, the 6-bit one last
    bits = torch.tensor([2, 4, 2, 2, 6])
    assert solve_order(energy, "act", bits).tolist() == [2, 3, 0, 1, 4]


def test_narrow_first_sorts_widths_within_each_unit_and_keeps_the_units():
    from sparsegpt_enhanced import solve_order
    energy = torch.rand(10)
    bits = torch.tensor([4, 2, 8, 3, 4, 6, 2, 2, 4, 3])
    # units of 4 columns: [0..3], [4..7], [8, 9]; by width within each, ties in stored order
    assert solve_order(energy, "narrow_first", bits, unit=4).tolist() == [1, 3, 0, 2, 6, 7, 4, 5, 9, 8]
    assert solve_order(energy, "narrow_first", torch.full((10,), 4), unit=4) is None  # one width: as stored
    assert solve_order(energy, "narrow_first", None, unit=4) is None


@pytest.mark.parametrize("flags, expected", [
    (["--wbits", "4", "--target_avg_bits", "4"], "act"),  # mixed without sparsity or groups
    (["--wbits", "4", "--target_avg_bits", "4", "--no-act-order"], "stored"),
    (["--wbits", "4", "--target_avg_bits", "4", "--sparsity", "0.5"], "stored"),  # act order would move the masks
    (["--wbits", "4", "--target_avg_bits", "4", "--prunen", "2", "--prunem", "4"], "stored"),
    (["--wbits", "4", "--target_avg_bits", "4", "--groupsize", "16"], "stored"),
    (["--wbits", "4"], "stored"),  # uniform runs keep the reference order
    (["--wbits", "4", "--sparsity", "0.5"], "stored"),
    (["--wbits", "4", "--act-order"], "act"),
    (["--wbits", "4", "--sparsity", "0.5", "--act-order"], "act"),
])
def test_solve_order_default_is_act_order_only_for_mixed_runs_without_sparsity_or_groups(flags, expected):
    cfg = oe.parse_args(["model", "c4", *flags])
    validate(cfg)
    assert cfg.solve_order_as_run == expected


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    """sum_i (w_i - q_i)^T X^T X (w_i - q_i), in float64."""
    D = (W.double() - Q.double()) @ X.double().t()
    return float((D ** 2).sum())


@pytest.mark.parametrize("sample_rows", [256, 7])
def test_solved_clip_takes_the_factor_whose_solve_leaves_the_least_output_error(sample_rows):
    """Against the textbook column loop: each factor's own solve of the sampled rows, its output error."""
    from test_solver import correlated_inputs, textbook_solve

    X = correlated_inputs(400, 32, seed=3)
    solver = solver_for(X)
    W = torch.randn(12, 32, generator=torch.Generator().manual_seed(4))
    W[:, 5] *= 3  # a channel whose weights set the rows' ranges
    rows = torch.arange(12) if sample_rows >= 12 else torch.linspace(0, 11, sample_rows).round().long()
    factors = precision.clip_factors(0.5)
    chosen = {}
    for prune, kw in ((PruneSpec(sparsity=0.5), dict(sparsity=0.5)), (PruneSpec(), {})):
        settings = SolveSettings(prune, blocksize=16, fused=False)
        shrink = costs.solved_shrink(W, solver, settings, [2, 3, 4], factors, sample_rows=sample_rows)
        for b in (2, 3, 4):
            true = {f: output_error(W[rows], textbook_solve(W[rows], X, bits=[b] * 32, shrink=f, **kw)[0], X)
                    for f in factors}
            best = min(true, key=true.get)
            assert true[shrink.get(b, 1.0)] <= true[best] * 1.001, (kw, b, shrink, true)
            chosen[bool(kw), b] = shrink.get(b, 1.0)
    assert len(set(chosen.values())) > 1  # the factors differ by width and sparsity: the test can tell them apart


def test_the_undamped_output_error_of_a_solve_is_each_rows_error_on_the_inputs():
    """costs.undamped_row_error: each row's sum over the tokens of (x . (w0 - q))^2, from the solve's errors on the
    damped Hessian; a dead input channel (always zero) leaves its weights out."""
    from test_solver import correlated_inputs

    X = correlated_inputs(400, 32, seed=3)
    X[:, 7] = 0
    solver = solver_for(X)
    W = torch.randn(12, 32, generator=torch.Generator().manual_seed(4))
    settings = SolveSettings(PruneSpec(sparsity=0.5), blocksize=16, fused=False)
    result = solver.fasterprune(W, settings, QuantGrid.for_weight(W, False), torch.full((32,), 3))
    expected = ((X.double() @ (W.double() - result.weight.double()).t()) ** 2).sum(0)
    got = costs.undamped_row_error(result, W, solver, settings)
    assert torch.allclose(got.double(), expected, rtol=1e-3)


def test_clip_search_searches_widths_up_to_its_widest_and_leaves_wider_ones_unclipped():
    """A ClipSearch with `widest`: widths up to it get the factor whose solve leaves the least output error (the
    textbook loop's), wider ones none, though the full search clips them.
    --clip_search fast is such a search."""
    from test_solver import correlated_inputs, textbook_solve

    X = correlated_inputs(400, 32, seed=3)
    W = torch.randn(150, 32, generator=torch.Generator().manual_seed(4))
    W[:, 5] *= 3
    factors = precision.clip_factors(0.5)
    settings = SolveSettings(PruneSpec(sparsity=0.5), blocksize=16, fused=False)
    shrink = costs.range_factors(W, solver_for(X), settings, [2, 3, 4], precision.ClipSearch(factors, "solve", widest=2))
    full = costs.range_factors(W, solver_for(X), settings, [2, 3, 4], precision.ClipSearch(factors, "solve"))
    assert list(shrink) == [2] and {3, 4} <= set(full)
    true = {f: output_error(W, textbook_solve(W, X, bits=[2] * 32, shrink=f, sparsity=0.5)[0], X)
            for f in factors}
    assert true[shrink[2]] <= min(true.values()) * 1.001, (shrink, true)
    fast = precision.ClipSearch.named("fast", factors, "solve")
    assert (fast.widest, fast.planned) == (precision.FAST_CLIP_WIDEST, True)
    assert precision.FAST_CLIP_WIDEST == 4
    mixed = ["model", "c4", "--wbits", "3", "--target_avg_bits", "3"]
    on_gpu = oe.parse_args([*mixed, "--device", "cuda"]).mixed_precision.clip_search
    on_cpu = oe.parse_args([*mixed, "--device", "cpu"]).mixed_precision.clip_search
    assert (on_gpu.widest, on_gpu.planned) == (8, False) and (on_cpu.widest, on_cpu.planned) == (8, True)
    asked = oe.parse_args([*mixed, "--device", "cpu", "--clip_search", "full"]).mixed_precision.clip_search
    assert asked == on_gpu


@pytest.mark.parametrize("search, solves_per_linear", [("full", 2), ("once", 1), ("fast", 1)])
def test_fast_clip_search_searches_each_linear_once_in_model_scope(monkeypatch, search, solves_per_linear):
    """Model scope: the full search runs for the plan and again for the solve; once and fast keep the plan's
    factors, and the run's factors are then the plan's."""
    searched = []
    real = costs.solved_shrink

    def counted(weight, *args, **kw):
        searched.append(tuple(weight.shape))
        return real(weight, *args, **kw)

    monkeypatch.setattr(costs, "solved_shrink", counted)
    stats = compress_tiny(tiny_model(), sparsity=0.5, wbits=3, target_avg_bits=3.0, bit_method="budget",
                          bit_scope="model", clip_search=search, clip_min=0.5)
    assert len(searched) == solves_per_linear * len(stats) == solves_per_linear * 12


def test_solved_clip_objective_keeps_the_stored_target(monkeypatch):
    recorder = MaskRecorder(monkeypatch)  # the search's solves of sampled rows are not the model's
    stats = compress_tiny(tiny_model(), sparsity=0.5, wbits=3, target_avg_bits=3.0, bit_method="budget",
                          clip_objective="solve", clip_min=0.9)
    assert abs(recorder.stored_average() - 3.0) <= 0.02
    assert any(s.bits_per_column and len(set(s.bits_per_column)) > 1 for s in stats)


def test_clip_search_stops_at_clip_min():
    assert precision.clip_factors(0.8) == (1.0, 0.95, 0.9, 0.85, 0.8)
    assert precision.clip_factors(1.0) == (1.0,)
    cfg = oe.parse_args(["model", "c4", "--wbits", "3", "--target_avg_bits", "3"])
    assert min(cfg.mixed_precision.clip_factors) == 0.8
    assert oe.parse_args(["model", "c4", "--clip_min", "0.5"]).mixed_precision.clip_factors == precision.CLIP_FACTORS
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(UsageError):
            validate(oe.parse_args(["model", "c4", "--wbits", "3", "--target_avg_bits", "3", "--clip_min", bad]))


def test_uncompensated_clip_objective_weighs_each_columns_error_by_its_full_cost():
    torch.manual_seed(0)
    x = torch.randn(256, 32) * torch.linspace(0.1, 5, 32)
    solver = solver_for(x)
    W = torch.randn(16, 32)
    W[:, 31] *= 4  # the loudest channel holds each row's extreme weights: clamping them costs H_jj each
    model = rounding_model(solver, W, SolveSettings(PruneSpec(), sym=False, groupsize=-1))
    factors = precision.clip_factors(0.5)
    H = torch.diag(solver.hessian)
    for b in (2, 3, 4):
        grid = QuantGrid.rounding(W, False)
        full_cost = {f: float((((W - grid.round_at(W, b, f)) ** 2).sum(0) * H).sum()) for f in factors}
        best = min(full_cost, key=full_cost.get)
        assert costs.clip_ranges(model, [b], factors, "uncompensated").get(b, 1.0) == best
    assert costs.clip_ranges(model, [2, 3, 4], factors, "uncompensated") != \
        costs.clip_ranges(model, [2, 3, 4], factors, "solver")
