"""Issue 3 probe: weigh each output row's rounding error by how much the loss cares about that output
(diagonal Fisher of the dense model on the calibration windows), within each Linear and across all of them.

    PYTHONPATH=. python3 configs/fisher_probe.py OUT.json [SEEDS] [VARIANTS]   # repo root, ../shared copies in .local/

A scratch experiment, not part of the tool: the variants replace opt_enhanced.plan_model_bits so that
compress() takes their bits. Budget score of channel j at width b:
    importance_j * sum_i F_i kept_ij (w_ij - Q_b(w_ij))^2 / U_jj^2,   F_i = mean over tokens of (dLoss/dy_i)^2,
shrunk 25% toward the Linear's mean as in the shipped allocator. Since every Hessian is 2/n X^T X on the
same n tokens, these scores are in the same units (loss) in every Linear, so one budget can span the model.
Variants: shipped (layer scope, untouched); plan-layer (F = 1: the shipped score, but scored on the dense
model's inputs like --bit_scope model); fisher-layer; fisher-model; fisher-split (fisher-model decides
only how many bits each Linear gets; the shipped layer-scope allocator then picks the channels on the
compressed model's inputs, as usual). Validation as in importance_sweep.py.
"""
import json
import sys

import torch
import torch.nn.functional as F

import datautils
import opt_enhanced as oe
from modelutils import find_linears, forward_layer
from quant import QuantGrid
from sparsegpt_enhanced import solve_order, unstructured_mask

M, D, C = ".local/opt-mini", ".local/data", "/tmp/c1"
dev = torch.device("cuda")
VARIANTS = (sys.argv[3] if len(sys.argv) > 3 else "shipped,plan-layer,fisher-layer,fisher-model,fisher-split").split(",")
SEEDS = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
tok = datautils.get_tokenizer(M)
ptb = datautils._tokenize_long(tok, " ".join(l.strip() for l in open(f"{D}/ptb/ptb.valid.txt")))[None]
wt2 = datautils._tokenize_long(tok, "\n\n".join("" if l == " \n" else l for l in open(f"{D}/wikitext-2/wiki.valid.tokens")))[None]
c4h = datautils.get_calibration("c4", tok, 32, 12345, 2048, D, C).reshape(1, -1)
valid = {"wt2-valid": wt2, "ptb-valid": ptb, "c4-heldout": c4h}
test = {d: datautils.get_eval_ids(d, tok, 2048, D, C) for d in oe.EVAL_DATASETS}
shipped_plan = oe.plan_model_bits
shipped_compress_linear = oe.compress_linear


def output_fisher(model, calibration, batch_size=8):
    """{decoder-relative name: mean over tokens of (dLoss/dy)^2 per output unit} on an fp32 copy."""
    import copy
    m = copy.deepcopy(model).float().to(dev)
    acc, handles = {}, []
    for i, layer in enumerate(m.model.decoder.layers):
        for n, lin in find_linears(layer).items():
            key = f"model.decoder.layers.{i}.{n}"
            def hook(mod, gin, gout, key=key):
                g = gout[0].reshape(-1, gout[0].shape[-1]).float()
                acc[key] = acc.get(key, 0) + (g ** 2).sum(0)
            handles.append(lin.register_full_backward_hook(hook))
    ntok = 0
    for s in range(0, calibration.shape[0], batch_size):
        ids = calibration[s:s + batch_size].to(dev)
        logits = m(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        ntok += ids[:, 1:].numel()
    for h in handles:
        h.remove()
    del m
    return {k: v / ntok for k, v in acc.items()}


def weighted_error(weight, solver, cfg, rows_weight):
    """SparseGPT.rounding_error with each row's loss weighted by rows_weight (stored order)."""
    order = solve_order(solver.xtx.diagonal(), cfg.act_order)
    factor = solver.inverse_factor(cfg.percdamp, order)
    W = weight.float().clone() if order is None else weight.float()[:, order]
    grid = QuantGrid.rounding(W, cfg.sym, cfg.groupsize)
    W[:, factor.dead] = 0
    d = torch.diag(factor.upper)
    kept = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, W.shape[1], cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, W.shape[1])
        kept[:, i1:i2] = ~unstructured_mask(W[:, i1:i2], d[i1:i2], cfg.prune.sparsity)
    width = torch.empty(W.shape[1], dtype=torch.int64)
    r = rows_weight.float()[:, None]
    loss = torch.stack([((r * (W - grid.round(W, width.fill_(b))) ** 2) * kept).sum(0)
                        for b in sorted(cfg.bit_options)], 1) / d[:, None] ** 2
    loss[factor.dead] = 0
    return loss if order is None else loss[torch.argsort(order)]


def make_plan(fisher, model_scope):
    def plan(model, hidden, kwargs, cfg, dev_, log):
        layers = model.model.decoder.layers
        names, scores, sizes = [], [], []
        hidden = hidden.clone()
        for i, layer in enumerate(layers):
            linears = find_linears(layer)
            solvers = oe.collect_hessians(layer, list(linears), hidden, kwargs, cfg, dev_)
            for n, lin in linears.items():
                name = f"model.decoder.layers.{i}.{n}"
                solver = solvers[oe.SHARED_INPUT.get(n, n)]
                W = lin.weight.data
                _, imp = oe.importance(W, solver, cfg)
                f = fisher[name] if fisher is not None else torch.ones(W.shape[0], device=W.device)
                err = weighted_error(W, solver, cfg, f)
                err = 0.75 * err + 0.25 * err.mean(0, keepdim=True)
                names.append(name); scores.append(imp[:, None] * err)
                sizes.append(torch.full((W.shape[1],), W.shape[0]))
            forward_layer(layer, hidden, kwargs, cfg.batch_size, hidden)
        if model_scope:
            bits = oe.allocate(torch.cat(scores), torch.cat(sizes), cfg)
            out, at = {}, 0
            for n, s in zip(names, scores):
                out[n] = bits[at:at + len(s)]; at += len(s)
            return out
        return {n: oe.allocate(s, z, cfg) for n, s, z in zip(names, scores, sizes)}
    return plan


rows = []


def split(targets):
    """compress_linear with each Linear's own average-bit target; no plan."""
    import dataclasses

    def compress_linear(name, linear, solver, plan, cfg):
        return shipped_compress_linear(name, linear, solver, {}, dataclasses.replace(cfg, target_avg_bits=targets[name]))
    return compress_linear


def one(tag, variant, flags, seed):
    cfg = oe.parse_args([M, "c4", "--data_dir", D, "--cache_dir", C, "--seed", str(seed), "--quiet", *flags])
    model = oe.load_opt(M, True); oe.place(model, dev)
    calib = datautils.get_calibration("c4", tok, 128, seed, 2048, D, C)
    oe.plan_model_bits, oe.compress_linear = shipped_plan, shipped_compress_linear
    if variant == "fisher-split" and cfg.mixed:
        plan = make_plan(output_fisher(model, calib), True)(model, *oe.capture_layer_inputs(model, calib, dev, cfg.batch_size),
                                                             cfg, dev, None)
        oe.compress_linear = split({n: b.double().mean().item() for n, b in plan.items()})
    elif variant != "shipped" and cfg.mixed:
        fisher = None if variant == "plan-layer" else output_fisher(model, calib)
        oe.plan_model_bits = make_plan(fisher, variant == "fisher-model")
        cfg.bit_scope = "model"  # so that compress() asks for the plan
    out = oe.compress(model, calib, cfg, dev, oe.Log(True))
    r = {"tag": tag, "variant": variant, "seed": seed}
    if cfg.mixed:
        per = {}
        for st in out.stats:
            per.setdefault(st.name.split(".", 4)[-1], []).append(sum(st.bits_per_column) / st.columns)
        r["avg_bits_by_module"] = {k: round(sum(v) / len(v), 3) for k, v in per.items()}
        r["avg_bits"] = sum(sum(st.bits_per_column) * st.rows for st in out.stats) / sum(st.rows * st.columns for st in out.stats)
    r.update({k: oe.perplexity(model, v, 2048, dev, 8) for k, v in {**valid, **test}.items()})
    rows.append(r); print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    json.dump(rows, open(sys.argv[1], "w"), indent=1)


for seed in SEEDS:
    for bits in (3, 4):
        one(f"uniform{bits}", "shipped", ["--sparsity", "0.5", "--wbits", str(bits)], seed)
        for v in VARIANTS:
            one(f"budget{bits}", v, ["--sparsity", "0.5", "--wbits", str(bits), "--target_avg_bits", str(bits),
                                     "--bit_method", "budget"], seed)
