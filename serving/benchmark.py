"""Serving benchmark: `python -m serving.benchmark [--out DIR] ...`

Per Linear (random-weight OPT-1.3B and OPT-6.7B shapes: q/k/v/out h x h, fc1 4h x h, fc2 h x 4h) and per
whole decode step (a random-weight OPT of the 6.7B shape built from a transformers OPTConfig, a few layers,
static KV cache, the step captured as a CUDA graph), for
  fp16 (cuBLAS through F.linear), our kernels at uniform 4 and 3 bits and at mixed 4.0 / 3.0 average bits
  (a random mix of 2/3/4/6/8-bit input channels), per-row grids and group 128, and the anchors: gemlite's
  A16W4 Triton kernels at group 128 and torch's int4 weight-only matmul (tinygemm, bf16) at group 128,
at decode batches 1, 8, 32 and prefill 2048 tokens; plus the weights' GPU memory against the prediction.

Every timing is the median over runs timed with CUDA events, with the L2 cache overwritten before each run
(a layer's weights are cold in a real model), each call captured as a CUDA graph and replayed (so that a
microseconds-long kernel is not timed waiting for the Python that launches it; the log says how many calls could
not be captured and ran eagerly); a decode step is a CUDA-graph replay too. Our kernels are
autotuned first (the result lands in the on-disk tuning cache); before that, every kernel variant the
tuning will try is compiled in parallel worker processes (Triton's on-disk cache), so that compilation
does not occupy the GPU machine serially. One progress line per case; the record goes to OUT/serving.json
and the summary table, printed last, to OUT/serving_table.txt.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from quant import QuantGrid

from . import mixed_matmul as mm
from .anchors import gemlite_anchor, tinygemm_anchor
from .decode_step import build_opt, decoder_linears, set_module, time_decode_step
from .layout import ServingLayout, build_layout, dequantized_weight, permute_activations

MODELS = {"opt-1.3b": 2048, "opt-6.7b": 4096}  # hidden size; ffn = 4 * hidden
LINEARS = ("qkvo", "fc1", "fc2")

# realistic mixes: shares of the input channels per width, averaging exactly the target bits
MIXES: dict[str, dict[int, float]] = {
    "u4": {4: 1.0},
    "u3": {3: 1.0},
    "mixed4.0": {2: 0.12, 3: 0.29, 4: 0.40, 6: 0.12, 8: 0.07},
    "mixed3.0": {2: 0.41, 3: 0.38, 4: 0.14, 6: 0.04, 8: 0.03},
}
VARIANTS: dict[str, tuple[str, int]] = {  # name -> (mix, group size; 0 = one grid per row)
    "u4": ("u4", 0), "u3": ("u3", 0), "mixed4.0": ("mixed4.0", 0), "mixed3.0": ("mixed3.0", 0),
    "u4-g128": ("u4", 128), "mixed3.0-g128": ("mixed3.0", 128),
}


def linear_shape(model: str, linear: str) -> tuple[int, int]:
    """(rows = out_features, columns = in_features)."""
    h = MODELS[model]
    return {"qkvo": (h, h), "fc1": (4 * h, h), "fc2": (h, 4 * h)}[linear]


def column_widths(columns: int, mix: dict[int, float], generator: torch.Generator) -> torch.Tensor:
    """Each input channel's width: the mix's shares as exact counts, in random channel order."""
    counts = {b: int(round(share * columns)) for b, share in mix.items()}
    largest = max(counts, key=counts.get)
    counts[largest] += columns - sum(counts.values())
    bits = torch.cat([torch.full((k,), b) for b, k in counts.items()])
    return bits[torch.randperm(columns, generator=generator)]


def random_layer(rows: int, columns: int, variant: str, seed: int, device: str) -> tuple[ServingLayout, torch.Tensor]:
    """A layer as a compression leaves it: random weights rounded on their grids (asymmetric, the clip factors
    of 2 and 3 bits < 1), in the serving layout on `device`; and an fp16 bias."""
    mix, groupsize = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    bits = column_widths(columns, MIXES[mix], g)
    w = (torch.randn(rows, columns, generator=g) * 0.02).to(device)
    grid = QuantGrid.rounding(w, False, groupsize, shrink={2: 0.85, 3: 0.92})
    codes, _, _ = grid.codes_of(w, bits.to(device))
    del w
    layout = build_layout(codes, bits, None, grid)
    bias = (torch.randn(rows, generator=g) * 0.02).half().to(device)
    return layout, bias


def average_bits(layout: ServingLayout) -> float:
    return sum(b.bits * b.columns for b in layout.buckets) / layout.columns


# ---------------------------------------------------------------- timing


def time_us(fn: Callable[[], object], reps: int) -> float:
    if torch.cuda.is_available():
        return mm.time_us(fn, reps)
    fn()  # CPU dry run: wall clock
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def ceilings(device: str) -> dict[str, float]:
    """The two rates to compare with: device-to-device copy bandwidth (bytes read + written) and an fp16
    matrix product's rate, measured here."""
    if device != "cuda":
        return {}
    a = torch.empty(2 ** 28, dtype=torch.float16, device=device)  # 512 MiB
    b = torch.empty_like(a)
    us = mm.time_us(lambda: b.copy_(a), 10, flush=False)
    x = torch.randn(8192, 8192, dtype=torch.float16, device=device)
    y = torch.randn(8192, 8192, dtype=torch.float16, device=device)
    mus = mm.time_us(lambda: x @ y, 10, flush=False)
    return {"copy_TBps": 2 * a.numel() * 2 / us / 1e6, "fp16_matmul_TFLOPs": 2 * 8192 ** 3 / mus / 1e6}


# ---------------------------------------------------------------- anchors


# ---------------------------------------------------------------- precompiling


def _compile_task(task: tuple) -> tuple[str, float, str, dict[str, int]]:
    """(configuration, seconds, error, registers and spills per thread where Triton reports them)."""
    shape, config, m = task
    start = time.time()
    try:
        compiled = mm.precompile(shape, config, m)
        usage = {}
        try:
            compiled._init_handles()  # loads the binary, which fills in its register counts
            usage = {"regs": int(compiled.n_regs), "spills": int(compiled.n_spills)}
        except Exception:  # noqa: BLE001 - a diagnostic only; Triton versions differ here
            pass
        return (str(config), time.time() - start, "", usage)
    except Exception as exc:  # noqa: BLE001 - reported, the launch will compile (or fail) itself later
        return (str(config), time.time() - start, f"{type(exc).__name__}: {str(exc)[:300]}", {})


def compile_key(shape: mm.LaunchShape, config: mm.KernelConfig, m: int) -> tuple:
    """Launches with equal keys run one compiled kernel (the constexprs, dtypes, and how Triton specialises
    each integer: equal to 1, a multiple of 16, or neither)."""
    kernel, _, args, kwargs = mm.kernel_call(shape, config, m)

    def spec(a: Any) -> Any:
        if isinstance(a, int):
            return "1" if a == 1 else ("D" if a % 16 == 0 else "i")
        return str(a)

    return (kernel.__name__ if hasattr(kernel, "__name__") else str(kernel), tuple(spec(a) for a in args),
            tuple(sorted(kwargs.items())))


def precompile_all(tasks: list[tuple], workers: int, log: Callable[[str], None]) -> dict[str, Any]:
    unique: dict[tuple, tuple] = {}
    for task in tasks:
        unique.setdefault(compile_key(*task), task)
    start = time.time()
    failures: list[str] = []
    if workers > 1 and torch.cuda.is_available():
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_task, unique.values(), chunksize=1))
    else:
        results = [_compile_task(t) for t in unique.values()]
    failures = [f"{c}: {e}" for c, _, e, _ in results if e]
    cpu = sum(t for _, t, _, _ in results)
    usage = [(c, u) for c, _, e, u in results if u]
    log(f"precompiled {len(unique)} kernels ({len(tasks)} launches) in {time.time() - start:.1f} s wall, "
        f"{cpu:.1f} s summed over {workers} workers; {len(failures)} failed")
    for f in failures[:5]:
        log("  " + f)
    spilling = [(c, u) for c, u in usage if u["spills"]]
    if usage:
        log(f"registers per thread {min(u['regs'] for _, u in usage)}-{max(u['regs'] for _, u in usage)}; "
            f"{len(spilling)} of {len(usage)} kernels spill" + "".join(f"\n  {c}: {u}" for c, u in spilling[:8]))
    return {"kernels": len(unique), "wall_s": time.time() - start, "summed_s": cpu, "failures": failures,
            "usage": usage}


# ---------------------------------------------------------------- the decode step


# ---------------------------------------------------------------- main


@dataclass
class Record:
    env: dict[str, Any] = field(default_factory=dict)
    linears: list[dict[str, Any]] = field(default_factory=list)
    tuning: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    step: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for serving.json and the table")
    ap.add_argument("--models", default="opt-6.7b,opt-1.3b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="1,8,32,2048")
    ap.add_argument("--step-layers", type=int, default=4, help="decoder layers of the decode-step model (0: none)")
    ap.add_argument("--step-variants", default="mixed3.0,u4,u3,mixed4.0")
    ap.add_argument("--step-batches", default="1,8,32")
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--anchors", default="gemlite,tinygemm")
    ap.add_argument("--anchor-batches", default="", help="batches for the anchors (default: --batches)")
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds after compiling: optional phases are skipped past it")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = ap.parse_args(argv)
    global MODELS

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    os.makedirs(args.out, exist_ok=True)
    record = Record()
    log_file = open(os.path.join(args.out, "serving_log.txt"), "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t0:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    def save() -> None:
        with open(os.path.join(args.out, "serving.json"), "w") as f:
            json.dump(asdict(record), f, indent=1, default=str)

    measuring_since = [t0]  # the end of precompiling, once it is over

    def late(fraction: float = 1.0) -> bool:
        """Past this fraction of the deadline (counted from the end of precompiling): later optional work is
        skipped (and said so)."""
        return time.time() - measuring_since[0] > args.deadline * fraction

    if args.dry_run:
        MODELS = {"tiny": 64}
        args.models, args.batches, args.step_layers, args.reps = "tiny", "1,8,32", min(args.step_layers, 2), 2
        args.anchors = ""
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    batches = [int(b) for b in args.batches.split(",")]
    import triton

    record.env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                  "torch": torch.__version__, "triton": triton.__version__, "argv": sys.argv,
                  "sms": torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 0}
    try:
        record.env.update(ceilings(device))
    except Exception as exc:  # noqa: BLE001
        log(f"ceilings not measured: {exc}")
    log(f"env {record.env}")

    # ---- layers
    layers: dict[tuple[str, str, str], tuple[ServingLayout, torch.Tensor]] = {}
    seed = 0
    for model in models:
        for linear in LINEARS:
            rows, columns = linear_shape(model, linear)
            for variant in variants:
                seed += 1
                layers[model, linear, variant] = random_layer(rows, columns, variant, seed, device)
                layout = layers[model, linear, variant][0]
                record.memory.append({"model": model, "linear": linear, "variant": variant, "rows": rows,
                                      "columns": columns, "avg_bits": average_bits(layout),
                                      "stored_bytes": layout.stored_bytes(), "predicted_bytes": layout.predicted_bytes(),
                                      "fp16_bytes": 2 * rows * columns})
    record.phases["layers"] = time.time() - t0
    log(f"built {len(layers)} layouts")

    # ---- precompile every launch autotuning will try
    tasks = []
    for (model, linear, variant), (layout, bias) in layers.items():
        shape = mm.LaunchShape.of(layout, True)
        for m in batches:
            tasks += [(shape, c, m) for c in mm.candidate_configs(layout, m, torch.device(device))]
    try:
        record.env["precompile"] = precompile_all(tasks, args.workers if device == "cuda" else 1, log)
    except Exception as exc:  # noqa: BLE001 - e.g. a worker died: every launch then compiles on first use
        log(f"precompiling failed ({type(exc).__name__}: {str(exc)[:300]}); kernels compile on first use")
        record.env["precompile"] = {"kernels": 1, "failures": [repr(exc)]}
    record.phases["precompile"] = time.time() - t0
    measuring_since[0] = time.time()
    if len(record.env["precompile"]["failures"]) > record.env["precompile"]["kernels"] // 2 and len(models) > 1:
        log(f"most precompilations failed: each launch compiles on first use, so only {models[0]} is measured")
        models = models[:1]
    save()

    def time_linears(model: str) -> None:
        """fp16, then each of our variants tuned, checked against its dequantized weights and timed."""
        for linear in LINEARS:
            if late(fraction=0.55):
                log(f"skipping {model} {linear}: past the deadline")
                return
            rows, columns = linear_shape(model, linear)
            w16 = (torch.randn(rows, columns, device=device) * 0.02).half()
            b16 = (torch.randn(rows, device=device) * 0.02).half()
            for m in batches:
                x = torch.randn(m, columns, device=device).half()
                row = {"model": model, "linear": linear, "rows": rows, "columns": columns, "m": m,
                       "variant": "fp16", "us": time_us(lambda: F.linear(x, w16, b16), args.reps),
                       "bytes": 2 * rows * columns, "flops": 2 * m * rows * columns}
                record.linears.append(row)
                log(f"{model} {linear} m={m} fp16 {row['us']:.1f} us")
            for variant in variants:
                layout, bias = layers[model, linear, variant]
                w_ref = dequantized_weight(layout)
                for m in batches:
                    x = torch.randn(m, columns, device=device).half()
                    try:
                        tuned = mm.autotune(x, layout, bias, log=None, reps=10 if device == "cuda" else 1)
                        y = mm.launch(x, layout, bias, tuned.best)
                        ref = x.float() @ w_ref.t() + bias.float()
                        err = float((y.float() - ref).norm() / ref.norm())
                        record.checks.append({"model": model, "linear": linear, "variant": variant, "m": m,
                                              "config": tuned.best.as_dict(), "rel_err": err})
                        us = time_us(lambda: mm.launch(x, layout, bias, tuned.best), args.reps)
                        row = {"model": model, "linear": linear, "rows": rows, "columns": columns, "m": m,
                               "variant": variant, "us": us, "config": tuned.best.as_dict(), "rel_err": err,
                               "bytes": layout.stored_bytes(), "avg_bits": average_bits(layout),
                               "flops": 2 * m * rows * columns}
                        if m == 1:  # does reading x through the permutation in-kernel matter at decode?
                            gathered = tuned.best_where(gather=True)
                            permuted = tuned.best_where(gather=False)
                            perm_us = time_us(lambda: permute_activations(x, layout.perm), args.reps)
                            row["gather_in_kernel_us"] = gathered[1] if gathered else None
                            row["permuted_kernel_us"] = permuted[1] if permuted else None
                            row["permute_op_us"] = perm_us
                        record.tuning.append({"model": model, "linear": linear, "variant": variant, "m": m,
                                              "timings": [(c.as_dict(), t) for c, t in tuned.timings]})
                        record.linears.append(row)
                        log(f"{model} {linear} m={m} {variant} {us:.1f} us (err {err:.1e}) {tuned.best}")
                        if err > 1e-2:
                            record.errors.append(f"{model} {linear} {variant} m={m}: relative error {err:.2e}")
                    except Exception as exc:  # noqa: BLE001 - recorded; the other cases go on
                        record.errors.append(f"{model} {linear} {variant} m={m}: {type(exc).__name__}: {exc}")
                        log(f"{model} {linear} m={m} {variant} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                del w_ref
            save()

    anchors = [a for a in args.anchors.split(",") if a] if device == "cuda" else []
    anchor_batches = [int(b) for b in args.anchor_batches.split(",") if b] or batches

    def time_anchors(model: str) -> None:
        for linear in LINEARS:
            if late(fraction=0.9):
                log(f"skipping the anchors of {model} {linear}: past the deadline")
                return
            rows, columns = linear_shape(model, linear)
            bias = (torch.randn(rows, device=device) * 0.02).half()
            for name in anchors:
                try:
                    anchor = (gemlite_anchor if name == "gemlite" else tinygemm_anchor)(rows, columns, 128, bias, 7)
                    err = anchor.error(8)
                    for m in anchor_batches:
                        x = torch.randn(m, columns, device=device, dtype=anchor.x_dtype)
                        anchor.fn(x)
                        us = time_us(lambda: anchor.fn(x), args.reps)
                        record.linears.append({"model": model, "linear": linear, "rows": rows, "columns": columns,
                                               "m": m, "variant": anchor.name, "us": us, "rel_err": err,
                                               "bytes": anchor.weight_bytes, "flops": 2 * m * rows * columns,
                                               "configs_from": getattr(anchor, "configs", None)})
                        log(f"{model} {linear} m={m} {anchor.name} {us:.1f} us (err {err:.1e})")
                except Exception as exc:  # noqa: BLE001
                    record.errors.append(f"anchor {name} {model} {linear}: {type(exc).__name__}: {exc}")
                    log(f"anchor {name} {model} {linear} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    log(traceback.format_exc()[-1500:])
            save()

    def time_step() -> None:
        from .qlinear import QuantLinear

        hidden = MODELS["opt-6.7b"] if not args.dry_run else MODELS["tiny"]
        model = build_opt(args.step_layers, hidden, device)
        decoder = model.model.decoder
        names = decoder_linears(decoder)  # q, k, v, out, fc1, fc2 of every layer
        fp16_bytes = sum(2 * decoder.get_submodule(n).weight.numel() for n in names)
        step_batches = [int(b) for b in args.step_batches.split(",")]
        for variant in ["fp16"] + [v for v in args.step_variants.split(",") if v]:
            if late(fraction=0.75):
                log(f"skipping decode step {variant}: past the deadline")
                break
            try:
                mem = {}
                if variant != "fp16":
                    gc.collect()  # the last variant's KV caches and graphs sit in reference cycles: freed now,
                    if device == "cuda":  # not between the two readings below
                        torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated() if device == "cuda" else 0
                    modules, predicted, bias_bytes = {}, 0, 0
                    for i, name in enumerate(names):
                        old = decoder.get_submodule(name)
                        rows, columns = old.out_features, old.in_features
                        linear = {"fc1": "fc1", "fc2": "fc2"}.get(name.rsplit(".", 1)[-1], "qkvo")
                        base = layers.get(("opt-6.7b" if not args.dry_run else "tiny", linear, variant))
                        if base is None:
                            base = random_layer(rows, columns, variant, 1000 + i, device)
                        # every Linear gets its own copy of the codes (no two layers share cache lines)
                        layout = base[0].with_tensors({k: None if t is None else t.clone()
                                                       for k, t in base[0].tensors().items()})
                        modules[name] = QuantLinear(layout, base[1])  # keeps its own copy of the bias
                        predicted += layout.predicted_bytes()
                        bias_bytes += 2 * rows
                        del layout, base
                    if device == "cuda":
                        torch.cuda.synchronize()
                    after = torch.cuda.memory_allocated() if device == "cuda" else 0
                    for name, module in modules.items():
                        set_module(decoder, name, module)
                    del modules
                    if device == "cuda":  # the allocator's count: there is none for the CPU
                        measured = after - before - bias_bytes
                        mem = {"weights_bytes_measured": measured, "weights_bytes_predicted": predicted,
                               "ratio": measured / predicted if predicted else None, "fp16_bytes": fp16_bytes}
                        log(f"decode step {variant}: weights {measured / 2 ** 20:.1f} MiB on the GPU, predicted "
                            f"{predicted / 2 ** 20:.1f} MiB ({mem['ratio']:.4f}x), fp16 {fp16_bytes / 2 ** 20:.1f} MiB")
                for batch in step_batches:
                    res = time_decode_step(model, batch, args.cache_len, args.cache_len // 2, args.reps, device)
                    entry = {"variant": variant, "batch": batch, "layers": args.step_layers, **res, **mem}
                    entry["us_per_layer"] = res["us"] / args.step_layers
                    record.step.append(entry)
                    log(f"decode step {variant} batch {batch}: {res['us']:.1f} us "
                        f"({entry['us_per_layer']:.1f} us per layer, graph {res['graph']})")
            except Exception as exc:  # noqa: BLE001
                record.errors.append(f"decode step {variant}: {type(exc).__name__}: {exc}")
                log(f"decode step {variant} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                log(traceback.format_exc()[-2000:])
            save()

    for model in models:
        time_linears(model)
        record.phases[f"linears {model}"] = time.time() - t0
        if model == models[0] and args.step_layers > 0:
            time_step()
            record.phases["step"] = time.time() - t0
        time_anchors(model)
        record.phases[f"anchors {model}"] = time.time() - t0
    if device == "cuda":
        record.env["timed_calls"] = dict(mm.GRAPH_CAPTURES)
        log(f"timed calls: {mm.GRAPH_CAPTURES['graphed']} as CUDA graphs, {mm.GRAPH_CAPTURES['eager']} eagerly "
            "(those could not be captured)")
    save()
    table = summary(record, models, batches)
    with open(os.path.join(args.out, "serving_table.txt"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return 0


def summary(record: Record, models: list[str], batches: list[int]) -> str:
    """The table printed last: per model and Linear, microseconds per variant and batch, and speedups."""
    by = {(r["model"], r["linear"], r["variant"], r["m"]): r for r in record.linears}
    variants = []
    for r in record.linears:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    lines = [f"device {record.env.get('device')}, copy {record.env.get('copy_TBps', 0):.2f} TB/s, fp16 matmul "
             f"{record.env.get('fp16_matmul_TFLOPs', 0):.0f} TFLOP/s; times in us (median, cold L2)"]
    for model in models:
        for m in batches:
            lines.append(f"{model} m={m:<5}" + "".join(f"{v:>17}" for v in variants))
            for linear in LINEARS:
                cells = []
                base = by.get((model, linear, "fp16", m))
                for v in variants:
                    r = by.get((model, linear, v, m))
                    if r is None:
                        cells.append(f"{'-':>17}")
                    elif v == "fp16" or base is None:
                        cells.append(f"{r['us']:17.1f}")
                    else:
                        cells.append(f"{r['us']:9.1f} ({base['us'] / r['us']:4.2f}x)")
                lines.append(f"  {linear:<12}" + "".join(cells))
    if record.step:
        base = {s["batch"]: s["us"] for s in record.step if s["variant"] == "fp16"}
        lines.append("decode step (CUDA graph), us per step / per layer, speedup over fp16, weight memory vs prediction")
        for s in record.step:
            speed = base.get(s["batch"], math.nan) / s["us"]
            memo = f", mem {s['ratio']:.4f}x pred" if s.get("ratio") else ""
            lines.append(f"  {s['variant']:<10} batch {s['batch']:<3} {s['us']:9.1f} / {s['us_per_layer']:8.1f}"
                         f"  {speed:5.2f}x{memo}")
    if record.errors:
        lines.append(f"{len(record.errors)} errors: " + " | ".join(e[:160] for e in record.errors[:6]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
