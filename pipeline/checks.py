"""The checks before any work: every flag, output path, process count and model property that can be checked in
seconds is, so that a user's mistake is one line and exit 2 before anything is loaded or written
(`UsageError`; a model that cannot be used: modelutils.ModelError).
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch

import datautils
from formats import compressed_tensors_checkpoint
from modelutils import hub_reachable, is_packed_export, linear_names, load_config, model_source
from pipeline import lm_eval_tasks
from pipeline.config import CHOICES, RunConfig, UsageError
from pipeline.placement import check_export_files, device_memory, run_device
from systems import distributed
from systems.progress import set_stage
from tokenizer_loading import get_tokenizer


def check_outputs(cfg: RunConfig) -> None:
    """Every output path, before any work: its parent is an existing, writable directory; a directory
    output (--save, --export) is new or an empty directory; a file output (--results_json, --plot) is not
    a directory; no two outputs share a path."""
    seen: dict[str, str] = {}
    outputs = [("--save", cfg.save, True), ("--export", cfg.export, True),
               ("--results_json", cfg.results_json, False), ("--plot", cfg.plot, False)]
    example = {"--results_json": "run.json", "--plot": "bits.png"}
    for flag, path, is_dir in outputs:
        if not path:
            continue
        full = os.path.abspath(os.path.expanduser(path))
        if full in seen:
            raise UsageError(f"{seen[full]} and {flag} both name {path}: they need different paths")
        seen[full] = flag
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            what = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise UsageError(f"{flag} {path}: its parent {parent} {what}; create the directory or choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: cannot write into {parent} (permission denied); choose a writable "
                             f"directory")
        if is_dir and os.path.exists(full) and not os.path.isdir(full):
            raise UsageError(f"{flag} {path} is a file; {flag} writes a directory: choose a new directory path")
        if is_dir and os.path.isdir(full) and os.listdir(full):
            raise UsageError(f"{flag} {path} exists and is not empty; choose a new directory")
        if not is_dir and os.path.isdir(full):
            raise UsageError(f"{flag} {path} is a directory; give a file path (e.g. "
                             f"{os.path.join(path, example[flag])})")
        if not is_dir and os.path.exists(full) and not os.access(full, os.W_OK):
            raise UsageError(f"{flag} {path} exists and is read-only; choose another file")


def check_processes(cfg: RunConfig) -> None:
    """--gpus, or the processes torchrun started: one GPU each, and a calibration window each."""
    launched = distributed.launched_size()
    if cfg.gpus < 0:
        raise UsageError(f"--gpus {cfg.gpus}: give a number of processes (GPUs), e.g. 2")
    if launched > 1 and cfg.gpus not in (0, launched):
        raise UsageError(f"--gpus {cfg.gpus} under a launcher that started {launched} processes: drop --gpus "
                         f"(torchrun's --nproc_per_node decides)")
    processes = max(launched, cfg.gpus)
    if processes <= 1:
        return
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {cfg.device}: several processes run on CUDA (NCCL) or the CPU (gloo) only")
    if dev.type == "cuda" and dev.index is not None:
        raise UsageError(f"--device {cfg.device} with {processes} processes: each takes its own GPU "
                         f"(cuda:LOCAL_RANK); give --device cuda")
    if dev.type == "cuda" and processes > torch.cuda.device_count():
        raise UsageError(f"{processes} processes need {processes} GPUs; this host has {torch.cuda.device_count()}")
    distributed.check_launch(processes, dev.type, UsageError)
    if cfg.nsamples < processes:
        raise UsageError(f"--nsamples {cfg.nsamples}: each of the {processes} processes needs a calibration "
                         f"window; give at least {processes}")


def validate(cfg: RunConfig) -> None:
    """Reject what would waste a run, each with the fix in the message."""
    if not cfg.model.strip():
        raise UsageError("the model argument is empty: give a local model directory (e.g. ../shared/models/opt-mini) "
                         "or a hub id (facebook/opt-125m)")
    for flag, value in (("--sparsity", cfg.sparsity), ("--percdamp", cfg.percdamp),
                        ("--target_avg_bits", cfg.target_avg_bits), ("--error_shrinkage", cfg.error_shrinkage),
                        ("sensitivity_shrinkage", cfg.sensitivity_shrinkage),
                        ("--clip_min", cfg.clip_min)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} {value} is not a finite number; see --help for its range and default")
    if cfg.percdamp < 0:
        raise UsageError(f"--percdamp {cfg.percdamp} is negative: give a fraction (>= 0) of the mean Hessian "
                         f"diagonal, e.g. 0.01")
    if cfg.groupsize == 0 or cfg.groupsize < -1:
        raise UsageError(f"--groupsize {cfg.groupsize}: give a positive number of columns (e.g. 128), "
                         f"or -1 for one grid per row")
    if cfg.seqlen < 0 or cfg.seqlen == 1:
        raise UsageError(f"--seqlen {cfg.seqlen}: a window needs at least 2 tokens (one predicts the next); "
                         f"give --seqlen 2 or more (0 = the model's max positions)")
    if not cfg.eval:
        raise UsageError(f"--eval is empty: name at least one of {','.join(datautils.DATASETS)}")
    unknown = [d for d in cfg.eval if d not in datautils.DATASETS]
    if unknown:
        raise UsageError(f"unknown dataset {unknown[0]!r} in --eval; choose from {', '.join(datautils.DATASETS)}")
    weights = cfg.importance_weights
    if len(weights) != 5 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
        raise UsageError(f"--importance_weights takes five non-negative numbers, not all zero, e.g. 1,1,1,1,1 "
                         f"(got {','.join(map(str, weights))})")
    options = cfg.allowed_widths
    if cfg.mixed and len(set(options)) == 1:
        raise UsageError(f"--bit_options {options[0]} with --target_avg_bits is uniform quantization: drop "
                         f"--target_avg_bits (--wbits {options[0]} alone does that) or give several widths, "
                         f"e.g. 2,3,4,6,8")
    if cfg.prunen > 0 and cfg.prunem > 0 and cfg.blocksize > 0 and cfg.blocksize % cfg.prunem:
        divisors = [m for m in range(cfg.prunen + 1, min(cfg.blocksize, 16) + 1) if cfg.blocksize % m == 0]
        instead = f"an M that divides {cfg.blocksize} (e.g. {divisors[0]}) or " if divisors else ""
        raise UsageError(f"--prunem {cfg.prunem} does not divide --blocksize {cfg.blocksize}: N:M groups restart at "
                         f"every block; choose {instead}a --blocksize that is a multiple of {cfg.prunem}")
    if cfg.device:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise UsageError(f"--device {cfg.device!r} is not a device: use cpu or cuda (or cuda:0, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: CUDA is not available here; use --device cpu "
                             f"(or leave --device out)")
    check_processes(cfg)
    if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        raise UsageError(f"--cache_dir {cfg.cache_dir} is a file, not a directory; choose a directory "
                         f"(it is created if absent)")
    check_outputs(cfg)
    if not 0 <= cfg.sparsity < 1:
        raise UsageError(f"--sparsity {cfg.sparsity} is outside [0, 1)")
    if (cfg.prunen > 0) != (cfg.prunem > 0):
        raise UsageError("give both --prunen and --prunem (e.g. --prunen 2 --prunem 4)")
    if cfg.prunen and (cfg.prunen < 0 or cfg.prunen >= cfg.prunem):
        raise UsageError(f"--prunen {cfg.prunen} must be below --prunem {cfg.prunem}")
    if cfg.prunen and cfg.sparsity:
        raise UsageError("use either --sparsity or --prunen/--prunem, not both")
    if sorted(set(options)) != sorted(options) or not options or \
            any(b < 1 or b > 16 for b in options):
        raise UsageError(f"--bit_options {','.join(map(str, options))}: give distinct widths in 1..16, "
                         f"e.g. 2,3,4,6,8")
    if cfg.wbits != 16 and cfg.wbits not in options:
        raise UsageError(f"--wbits {cfg.wbits} is not among --bit_options {','.join(map(str, options))} (or 16 = off)")
    if cfg.mixed:
        if not cfg.quantize:
            raise UsageError("--target_avg_bits needs a base width: add --wbits 4 (or another of --bit_options)")
        lo, hi = min(options), max(options)
        if not lo <= cfg.target_avg_bits <= hi:
            raise UsageError(f"--target_avg_bits {cfg.target_avg_bits} is outside [{lo}, {hi}] of --bit_options")
        if cfg.nearest:
            raise UsageError("--target_avg_bits needs calibration statistics; drop --nearest")
        if (cfg.offload or cfg.stream) and (cfg.bit_scope == "model" or cfg.bit_granularity == "linear"):
            raise UsageError("--bit_scope model (and --bit_granularity linear) needs the whole model on the run's "
                             "device; drop --offload/--stream or use --bit_scope layer")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name} {getattr(cfg, name)!r}: give one of {'|'.join(allowed)}")
    if not 0 < cfg.clip_min <= 1:
        raise UsageError(f"--clip_min {cfg.clip_min} is outside (0, 1]: the smallest share of the min-max range "
                         f"the clip search tries, e.g. 0.5")
    for flag, value in (("--error_shrinkage", cfg.error_shrinkage),
                        ("sensitivity_shrinkage", cfg.sensitivity_shrinkage)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{flag} {value} is outside [0, 1]")
    if cfg.clip_sample_rows < 1:
        raise UsageError(f"clip_sample_rows {cfg.clip_sample_rows}: the clip search solves at least one row")
    if not 0 <= cfg.sensitivity_windows <= cfg.nsamples:
        raise UsageError(f"sensitivity_windows {cfg.sensitivity_windows}: between 1 and --nsamples ({cfg.nsamples}), "
                         "or 0 for all")
    if cfg.bit_granularity == "linear" and not (cfg.mixed and cfg.bit_scope != "layer"):
        raise UsageError("--bit_granularity linear allocates one width per Linear across the whole model: "
                         "add --target_avg_bits, and drop --bit_scope layer")
    if cfg.clip == "width" and (not cfg.quantize or cfg.nearest or cfg.gmp):
        raise UsageError("--clip width chooses ranges from calibration statistics: it needs --wbits and "
                         "no --nearest/--gmp")
    if cfg.clip_search not in ("auto", "full") and not cfg.clipped:
        raise UsageError(f"--clip_search {cfg.clip_search} sets how range factors are searched, and this run searches "
                         f"none: add --target_avg_bits or --clip width")
    if cfg.row_ranges == "search" and (not cfg.quantize or cfg.nearest or cfg.gmp or cfg.groupsize > 0):
        raise UsageError("--row_ranges search chooses each row's range by solves: it needs --wbits, one grid per row "
                         "(no --groupsize) and no --nearest/--gmp")
    if cfg.nearest and not cfg.quantize:
        raise UsageError("--nearest rounds weights: add --wbits 4 (or another width)")
    if cfg.nearest and cfg.prune.active and not cfg.gmp:
        raise UsageError("--nearest does not prune; add --gmp for magnitude pruning or drop --nearest")
    if cfg.solve_order == "act" and (cfg.prunen or cfg.groupsize > 0 or cfg.gmp or cfg.nearest):
        raise UsageError("--act-order works with unstructured sparsity and per-row grids only; drop it or "
                         "--prunen/--prunem/--groupsize/--gmp/--nearest")
    if cfg.solve_order == "narrow_first" and (not cfg.mixed or cfg.groupsize > 0 or cfg.gmp or cfg.nearest):
        raise UsageError("solve_order narrow_first orders the columns of a mixed run by width, with per-row grids: "
                         "add --target_avg_bits, drop --groupsize/--gmp/--nearest, or choose another order")
    if cfg.gmp and not cfg.prune.active:
        raise UsageError("--gmp needs --sparsity (or --prunen/--prunem)")
    if cfg.gmp and cfg.quantize and not cfg.nearest:
        raise UsageError("--gmp is a pruning baseline; add --nearest to also round weights")
    if cfg.dataset not in datautils.DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(datautils.DATASETS)}")
    for flag, value, example in (("--nsamples", cfg.nsamples, 128), ("--blocksize", cfg.blocksize, 128),
                                 ("--batch_size", cfg.batch_size, 8)):
        if value < 1:
            raise UsageError(f"{flag} {value}: give a positive number (e.g. {example})")
    model_source(cfg.model)  # a missing local model directory fails here
    check_packed_export(cfg)
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise UsageError(f"--data_dir {cfg.data_dir} is not a directory; give the folder holding "
                         f"wikitext-2-raw/, ptb/ and c4/ (e.g. ../shared/data)")
    if cfg.plot:
        if not cfg.quantize:
            raise UsageError("--plot shows bit-widths: add --wbits (and --target_avg_bits for mixed precision)")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
    if cfg.export and not cfg.quantize:
        raise UsageError("--export packs quantized weights: add --wbits (or use --save for an fp16 checkpoint)")
    if cfg.stream and cfg.export:
        raise UsageError("--export packs the whole model in host memory; with --stream use --save (then export "
                         "from the saved directory)")
    if cfg.lm_eval:
        if cfg.offload or cfg.stream:  # before the installation: no install would make this combination work
            raise UsageError("--lm_eval runs the whole model on the device; drop --offload/--stream")
        if not lm_eval_tasks.available():
            raise UsageError("--lm_eval needs lm-evaluation-harness: pip install lm-eval accelerate")
        if cfg.lm_eval_include and not os.path.isdir(cfg.lm_eval_include):
            raise UsageError(f"--lm_eval_include {cfg.lm_eval_include} is not a directory of task definitions")
        unknown = lm_eval_tasks.unknown_tasks(cfg.lm_eval, cfg.lm_eval_include or None)
        if unknown:
            raise UsageError(f"--lm_eval: unknown task(s) {', '.join(unknown)}; give lm-eval task names, or local "
                             "task definitions with --lm_eval_include DIR")
        lm_eval_tasks.check_sources(cfg.lm_eval, cfg.lm_eval_include or None, cfg.data_dir)  # data files, the hub
    if cfg.export_format == "compressed-tensors":
        if not compressed_tensors_checkpoint.available():
            raise UsageError("--export_format compressed-tensors needs the compressed-tensors package: "
                             "pip install 'compressed-tensors>=0.17'")
        if cfg.mixed and cfg.bit_granularity != "linear":
            raise UsageError("compressed-tensors stores one width per Linear: add --bit_granularity linear "
                             "--bit_scope model, or use --export_format packed for per-channel widths")
        widths = cfg.allowed_widths if cfg.mixed else [cfg.wbits]
        if max(widths) > compressed_tensors_checkpoint.MAX_WIDTH:
            raise UsageError(f"compressed-tensors packs 1..{compressed_tensors_checkpoint.MAX_WIDTH} bits; "
                             f"choose widths up to {compressed_tensors_checkpoint.MAX_WIDTH}")


def check_model(cfg: RunConfig) -> None:
    """The checks that need the model's config and tokenizer but no weights (seconds, before any work):
    a supported family, calibration windows whose layer inputs fit in the device's memory, a tokenizer that fits
    the embedding, a layer selection that picks some Linear, and a way to the data (--data_dir, or a hub that
    answers)."""
    set_stage("checking the model")
    config = load_config(cfg.model)
    check_export_files(cfg.model, config)  # a damaged export, named, before any weight is read
    compressed_tensors_checkpoint.check_layout(cfg, config, UsageError)  # its groups must tile every row
    seqlen = cfg.seqlen or config.max_position_embeddings
    width = 2 if str(config.dtype).endswith("float16") else 4  # (config.torch_dtype would draw a deprecation warning)
    windows = -(-cfg.nsamples // distributed.launched_size())  # each process holds its share of the windows
    need, dev = windows * seqlen * config.hidden_size * width, run_device(cfg)
    if need > device_memory(dev):
        raise UsageError(f"--nsamples {cfg.nsamples} windows of {seqlen} tokens are {need / 2 ** 30:.1f} GiB of layer "
                         f"inputs (hidden size {config.hidden_size}) per process, more than the "
                         f"{device_memory(dev) / 2 ** 30:.1f} GiB the {dev.type} has; lower --nsamples (e.g. 128) or "
                         f"--seqlen")
    if cfg.prune.active or cfg.quantize:
        names = linear_names(config)
        if not any(cfg.selected(i, n) for i, layer in enumerate(names) for n in layer):
            flags = f"--minlayer {cfg.minlayer} --maxlayer {cfg.maxlayer}" + \
                (f" --prune_only {cfg.prune_only}" if cfg.prune_only else "") + (" --invert" if cfg.invert else "")
            raise UsageError(f"{flags} selects no Linear layer of {cfg.model} (layers 0..{len(names) - 1}, each with "
                             f"{', '.join(names[0] if names else [])}): nothing would be compressed; widen the "
                             f"selection")
    tokenizer = get_tokenizer(cfg.model)
    # More tokens than embedding rows cannot run; fewer than half of them leaves most rows unused, which no model
    # is trained with (their tokenizers fill 90-100% of it), but it runs, to a perplexity that means nothing.
    if not config.vocab_size // 2 <= len(tokenizer) <= config.vocab_size:
        raise UsageError(f"the tokenizer in {cfg.model} has {len(tokenizer)} tokens but the model's embedding has "
                         f"{config.vocab_size}: its tokenizer files belong to another model; copy the model's own")
    offline = any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if cfg.data_dir is None and not offline and not hub_reachable():
        raise UsageError("the Hugging Face hub cannot be reached for the datasets: pass --data_dir DIR with the "
                         "offline data (layout of ../shared/data)")


def check_packed_export(cfg: RunConfig) -> None:
    """A packed export (--export) is compressed already and holds codes in the serving layout, not a checkpoint:
    it can be evaluated (perplexity, --lm_eval) on a device that holds it, not compressed again or rewritten."""
    if not is_packed_export(cfg.model):
        return
    if cfg.prune.active or cfg.quantize or cfg.gmp or cfg.nearest:
        raise UsageError(f"{cfg.model} is a packed export, compressed already: evaluate it without "
                         f"--sparsity/--prunen/--wbits, or compress the model it was made from")
    if cfg.save or cfg.export:
        raise UsageError(f"{cfg.model} is a packed export: --save/--export would only copy it; evaluate it, or "
                         f"export the model it was made from again")
    if cfg.offload or cfg.stream:
        raise UsageError(f"{cfg.model} is a packed export, a few bits per weight: it is evaluated on the device "
                         f"whole; drop --offload/--stream")
