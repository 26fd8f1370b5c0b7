"""One run: load the model while the data is tokenized, compress, evaluate, then write the outputs asked for.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn

import datautils
from formats.compressed_tensors_checkpoint import export_compressed_tensors
from formats.packed import export_compressed, write_run_record
from mixed.stats import LinearStats, format_summary, plot_bits, summarize
from modelutils import import_transformers, layer_store, load_config
from pipeline import lm_eval_tasks
from pipeline.compress import Compressed, compress
from pipeline.config import RunConfig, UsageError
from pipeline.evaluate import eval_windows, perplexity
from pipeline.placement import load_and_place, run_device, use_device
from systems import distributed, streaming
from systems.atomic_io import atomic_directory, nonfinite_path, write_json
from systems.interrupts import Background
from systems.progress import Log, Stages, set_stage
from tokenizer_loading import get_tokenizer


def tokenize(cfg: RunConfig, stage: Stages) -> tuple[Any, int, torch.Tensor, dict[str, torch.Tensor]]:
    """(tokenizer, seqlen, calibration windows, evaluation ids by dataset)."""
    with stage("tokenize", gpu=False):
        positions = load_config(cfg.model).max_position_embeddings  # the config alone, no weights
        seqlen = cfg.seqlen or positions
        if seqlen > positions:
            raise UsageError(f"--seqlen {seqlen} exceeds the model's {positions} positions")
        tokenizer = get_tokenizer(cfg.model)
        calibration = datautils.get_calibration(cfg.dataset, tokenizer, cfg.nsamples, cfg.seed, seqlen,
                                                cfg.data_dir, cfg.cache_dir)
        eval_ids = {d: datautils.get_eval_ids(d, tokenizer, seqlen, cfg.data_dir, cfg.cache_dir) for d in cfg.eval}
    return tokenizer, seqlen, calibration, eval_ids


def run(cfg: RunConfig, startup: float | None = None) -> dict[str, Any]:
    """One run: load, compress, evaluate, write the outputs. Under torchrun every rank runs it (inside
    `distributed.session`); only rank 0 logs, runs --lm_eval and writes outputs, and the others return
    their perplexities and timings alone. `startup`: the seconds the process took to get here (main() gives
    them; its timings then hold them, apart from `total`)."""
    log = Log(cfg.quiet or not distributed.is_main())
    dev = run_device(cfg)
    use_device(dev)
    # fp32 matmuls in full precision, as the published scripts set them (a run, not an import, decides this)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(cfg.seed)
    stage = Stages(dev)
    started = time.time()

    # A missing file fails at once; then the model loads on a thread while the data is tokenized (main() has
    # started the GPU: device_starting).
    datautils.check_sources(cfg.dataset, cfg.eval, cfg.data_dir)
    import_transformers()  # before the thread: two threads importing it at once can each find it half-initialised
    loading = Background(lambda: load_and_place(cfg, dev))
    try:
        tokenizer, seqlen, calibration, eval_ids = tokenize(cfg, stage)
    except BaseException:
        loading.join()  # from_pretrained patches torch process-wide while it runs: never leave it running behind
        raise
    with stage("load"):  # what is left of the load after tokenizing
        model = loading.result()
    log(f"model {cfg.model}: {model.config.num_hidden_layers} layers, seqlen {seqlen}; device {dev}")

    done = Compressed([], {}, {})
    with stage("compress"):
        if cfg.prune.active or cfg.quantize:
            with streaming.writing(model):  # a streamed model keeps its compressed layers (in files)
                done = compress(model, calibration, cfg, dev, log)
    stats = done.stats

    ppl: dict[str, float] = {}
    with stage("evaluate"):
        for d, ids in eval_ids.items():
            ppl[d] = perplexity(model, eval_windows(ids, seqlen), dev, cfg.batch_size, log=log, overlap=cfg.overlap)
            log(f"{d} perplexity: {ppl[d]:.3f}")
    if not distributed.is_main():  # no collective follows: rank 0 alone reports and writes
        return {"perplexity": ppl, "timings": dict(stage.seconds, total=time.time() - started)}
    scores = {}
    if cfg.lm_eval:
        with stage("lm_eval"):
            tasks = lm_eval_tasks.TaskRun(tuple(cfg.lm_eval), cfg.lm_eval_include or None, cfg.batch_size,
                                          cfg.data_dir, cfg.quiet)
            scores = lm_eval_tasks.evaluate(model.to(dev), tokenizer, str(dev), tasks)
        log(f"lm-eval: {json.dumps(scores)}")
    timings = dict(stage.seconds, total=time.time() - started)
    if startup is not None:
        timings["startup"] = startup

    summary = None
    if cfg.quantize:
        summary = summarize(stats)
        if summary.channels == 0:
            raise RuntimeError("quantization was requested but no channel was quantized (check --minlayer/--maxlayer/--prune_only)")
        log(format_summary(summary, stats))
        if cfg.mixed and cfg.clipped and cfg.clip_search == "auto" and cfg.clip_search_as_run == "once":
            log("Clip search: each Linear's range factors searched once (the CPU's default, 1.3x cheaper there; "
                "--clip_search full searches again for each solve, as on a GPU)")
    check_results(cfg, ppl, summary, stats)
    results = {
        "config": asdict(cfg),
        "perplexity": ppl,
        "timings": timings,
        "peak_gpu_gib": stage.peak_gib,
        "summary": None if summary is None else asdict(summary),
        "bit_scope": done.bit_scope,
        "solve_order": cfg.solve_order_as_run,  # auto resolved
        "mixed_precision": asdict(done.mixed_precision) if done.mixed_precision else None,  # as run: defaults resolved
        "layers": [asdict(s) for s in stats],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "processes": distributed.size(),
    }
    if scores:
        results["lm_eval"] = scores
    write_outputs(cfg, model, tokenizer, done, results, log)
    return results


def write_outputs(cfg: RunConfig, model: nn.Module, tokenizer, done: Compressed, results: dict[str, Any],
                  log: Log) -> None:
    """Every output the flags ask for, each written whole or not at all (checks.check_outputs made sure, before
    any work, that each path can be written). None of them changes the model: it was compressed already."""
    set_stage("writing the outputs")
    widths = list(done.mixed_precision.options) if done.mixed_precision else cfg.allowed_widths

    def extras(directory: str) -> None:  # what every exported directory holds besides the weights
        tokenizer.save_pretrained(directory)
        write_run_record(directory, results)

    if cfg.save:
        save_model(model, tokenizer, results, cfg.save)
    if cfg.export:
        set_stage(f"writing --export {cfg.export}")
        if cfg.export_format == "compressed-tensors":
            report = export_compressed_tensors(model.to("cpu"), done.grids, done.bits, cfg.export, extras)
        else:
            report = export_compressed(model.to("cpu"), done.grids, done.bits, cfg.export, cfg.prune.active,
                                       len(widths), extras)
        results["export"] = asdict(report)
        log(report.summary())
    if cfg.plot:
        plot_bits(done.stats, cfg.plot, widths)
    if cfg.results_json:
        write_json(results, cfg.results_json)


# A mixed run's stored average may miss its target by this much before the run counts as failed (the
# allocators keep it within 0.01 on the whole model; NaN importances once put every channel at the lowest width).
TARGET_TOLERANCE = 0.05


def check_results(cfg: RunConfig, ppl: dict[str, float], summary, stats: list[LinearStats]) -> None:
    """Results that cannot be right fail the run (RuntimeError, exit 1) before any output is written:
    a NaN or infinite perplexity, a mixed run whose stored average is off its target, a NaN statistic."""
    for d, value in ppl.items():
        if not math.isfinite(value):
            raise RuntimeError(f"{d} perplexity is {value}: the model's outputs are not finite; nothing was written "
                               f"(check the model's weights, or compress less: larger --percdamp, more bits, less "
                               f"sparsity)")
    if summary is not None and cfg.mixed and cfg.bit_granularity == "channel" and summary.channels and \
            not abs(summary.stored_bits - cfg.target_avg_bits) <= TARGET_TOLERANCE:
        raise RuntimeError(f"the allocation stores {summary.stored_bits:.3f} bits per weight where --target_avg_bits "
                           f"{cfg.target_avg_bits} was asked; nothing was written (check --importance_weights and "
                           f"--bit_options)")
    where = nonfinite_path({"summary": None if summary is None else asdict(summary),
                            "layers": [asdict(s) for s in stats]})
    if where is not None:
        raise RuntimeError(f"the results hold NaN/inf at {where}; nothing was written")


def save_model(model: nn.Module, tokenizer, results: dict[str, Any], path: str) -> None:
    """A from_pretrained-loadable checkpoint, written whole or not at all."""
    set_stage(f"writing --save {path}")
    with atomic_directory(path, prefix=".save-") as tmp:
        if layer_store(model) is not None:
            streaming.save_streamed(model, tmp)
        else:
            model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(results, os.path.join(tmp, "compression.json"))
    set_stage("writing the outputs")
