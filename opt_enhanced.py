"""Compress a causal language model one decoder layer at a time and report perplexity.

    python opt_enhanced.py MODEL DATASET [flags]

MODEL is a hub id (facebook/opt-125m) or a local directory of an OPT, Llama, Mistral or Qwen2 model (or an
export this tool wrote); DATASET (wikitext2, ptb, c4) is the calibration set. Flags and defaults follow
IST-DASLab's sparsegpt/gptq `opt.py`; the same flags give the same perplexities. Perplexity is then measured
on WikiText-2, PTB and C4.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import datautils
from mixed import precision
from pipeline import cli
from pipeline.config import CHOICES, SOLVE_ORDER_FLAGS, RunConfig, config_defaults


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default after its help (unless the help already
    says it, or there is none to show: a switch, an empty path)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default == "" or action.nargs == 0 or \
                default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse, but a malformed command line is one line on stderr (exit 2), like every other usage error,
    instead of the whole usage block above it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The flags, grouped as a reference user reads them; RunConfig's defaults are the only ones (none here)."""
    p = _Parser(description=__doc__, formatter_class=_HelpFormatter)
    p.set_defaults(**config_defaults())
    p.add_argument("model", help="hub id (facebook/opt-125m) or local model directory")
    p.add_argument("dataset", choices=datautils.DATASETS, help="calibration data")

    ref = p.add_argument_group("the reference's flags (IST-DASLab sparsegpt/gptq opt.py: same names, same defaults)")
    ref.add_argument("--seed", type=int, help="seed for sampling the calibration windows")
    ref.add_argument("--nsamples", type=int, help="number of calibration windows")
    ref.add_argument("--percdamp", type=float, help="damping, fraction of the mean Hessian diagonal")
    ref.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    ref.add_argument("--prunen", type=int, help="N of N:M sparsity")
    ref.add_argument("--prunem", type=int, help="M of N:M sparsity")
    ref.add_argument("--blocksize", type=int, help="columns per lazy-update block (and mask block)")
    ref.add_argument("--gmp", action="store_true", help="magnitude pruning baseline (no calibration)")
    ref.add_argument("--wbits", type=int, help="weight bits; 16 = no quantization")
    ref.add_argument("--groupsize", type=int, help="columns per quantization group; -1 = one grid per row")
    ref.add_argument("--sym", action="store_true", help="symmetric quantization grid")
    ref.add_argument("--nearest", action="store_true", help="round-to-nearest baseline (no calibration)")
    ref.add_argument("--minlayer", type=int, help="compress layers with index >= this")
    ref.add_argument("--maxlayer", type=int, help="compress layers with index < this")
    ref.add_argument("--prune_only", type=str, help="compress only Linear layers whose name contains this")
    ref.add_argument("--invert", action="store_true", help="invert the layer selection")
    ref.add_argument("--act-order", "--act_order", dest="solve_order", action="store_const", const="act",
                     help="GPTQ's flag: --solve_order act, columns by decreasing activation energy")
    ref.add_argument("--no-act-order", "--no_act_order", dest="solve_order", action="store_const", const="stored",
                     help="--solve_order stored, also in mixed runs")
    ref.add_argument("--solve_order", choices=SOLVE_ORDER_FLAGS,
                     help="the order the solver takes each Linear's columns in: stored, or act (GPTQ's act order); "
                          "auto: act for mixed runs without sparsity or groups, stored otherwise")

    data = p.add_argument_group("data and evaluation")
    data.add_argument("--seqlen", type=int, help="window length; 0 = the model's max positions")
    data.add_argument("--data_dir", type=str, help="offline data (layout of ../shared/data)")
    data.add_argument("--cache_dir", type=str, default=os.environ.get("OPT_ENHANCED_CACHE"),
                      help="cache of tokenized data (default: $OPT_ENHANCED_CACHE, else none)")
    data.add_argument("--eval", type=_list(str), help="datasets to report perplexity on")
    data.add_argument("--batch_size", type=int, help="windows per forward pass")
    data.add_argument("--lm_eval", type=_list(str),
                      help="lm-evaluation-harness tasks to run on the compressed model, comma-separated (needs lm-eval)")
    data.add_argument("--lm_eval_include", type=str,
                      help="a directory of local lm-eval task definitions (YAML), for --lm_eval")

    mixed = p.add_argument_group("mixed precision (a width per input channel under an average-bit target)")
    mixed.add_argument("--target_avg_bits", type=float,
                       help="average code bits per stored weight (with sparsity: per kept weight); needs --wbits")
    mixed.add_argument("--bit_method", choices=CHOICES["bit_method"], help="bit allocator")
    mixed.add_argument("--bit_scope", choices=CHOICES["bit_scope"],
                       help="one allocation over the whole model (errors in units of the loss), or each Linear "
                            "meeting the target; auto = model unless offloaded or streamed")
    mixed.add_argument("--bit_granularity", choices=CHOICES["bit_granularity"],
                       help="one width per input channel, or per Linear (q/k/v tied; needs model scope)")
    mixed.add_argument("--bit_options", type=_list(int),
                       help="allowed widths (default: " + ",".join(map(str, precision.BIT_OPTIONS)) + "; budget per "
                            "channel in model scope with sparsity at 4 bits or more: the widths next to the target, "
                            "3,4,6 at 4.0)")
    mixed.add_argument("--importance_weights", type=_list(float), help="weights of energy,outlier,weight,obs,sensitivity")
    mixed.add_argument("--error_shrinkage", type=float,
                       help="share of each channel's estimated error replaced by its Linear's mean (hedges against "
                            "text the calibration data does not excite; default: " +
                            ", ".join(f"{v} for {k}" for k, v in precision.ERROR_SHRINKAGE.items()) + ")")
    mixed.add_argument("--clip", choices=CHOICES["clip"],
                       help="shrink each width's range by the factor (per Linear) that minimises the error "
                            "(--clip_objective); auto = on for mixed precision, off (the reference grid) for uniform")
    mixed.add_argument("--clip_objective", choices=CHOICES["clip_objective"],
                       help="the loss that picks each width's range factor: the output error of actual solves on a "
                            "sample of rows (solve), the solver's estimate, or each column's error at its full cost")
    mixed.add_argument("--clip_min", type=float, help="the smallest range factor the clip search tries (1 = min-max only)")
    mixed.add_argument("--clip_search", choices=CHOICES["clip_search"],
                       help=f"full: every width's range factor searched, for the model-wide plan and again for the "
                            f"solve; once: for the plan only (in model scope; 1.5x cheaper on a CPU and as good on "
                            f"validation text there); fast: once, and only widths up to {precision.FAST_CLIP_WIDEST}; "
                            f"auto: once on a CPU, full on a GPU (benchmarks/mixed_cost.md)")
    mixed.add_argument("--row_ranges", choices=CHOICES["row_ranges"],
                       help="each row's quantization range: from the dense weights (the reference), or chosen by trial "
                            "solves among that range and (with pruning) the pruned weights' range, each scaled by "
                            "1/0.9/0.8 (search: no extra bits, six or seven solves per Linear)")

    out = p.add_argument_group("outputs (none of them changes the compression)")
    out.add_argument("--save", type=str, help="write a from_pretrained checkpoint (fp16 weights) to this new directory")
    out.add_argument("--export", type=str, help="write the compressed model in --export_format to this new directory")
    out.add_argument("--export_format", choices=("packed", "compressed-tensors"),
                     help="packed: our bit-packed codes at each column's width (formats.packed.load_compressed "
                          "reads it); compressed-tensors: transformers, vLLM and SGLang load it (uniform widths or "
                          "--bit_granularity linear)")
    out.add_argument("--results_json", type=str, help="write config, perplexities, statistics, timings here")
    out.add_argument("--plot", type=str, help="PNG heatmap of average bits per module and layer")

    sys_ = p.add_argument_group("systems (where and how it runs; the numbers stay the same)")
    sys_.add_argument("--device", type=str, help="cuda, cpu, ... (default: cuda if available)")
    sys_.add_argument("--gpus", type=int,
                      help="run as this many processes, one GPU each (what torchrun --standalone --nproc_per_node N "
                           "does, as one job: one error line, Ctrl-C stops them all); with --device cpu, CPU processes")
    sys_.add_argument("--offload", action="store_true",
                      help="keep the model on the CPU, one decoder layer on the GPU at a time (automatic when it "
                           "does not fit)")
    sys_.add_argument("--no-overlap", "--no_overlap", dest="overlap", action="store_false",
                      help="move offloaded layers to the GPU and back in line, not behind the computation")
    sys_.add_argument("--stream", action="store_true",
                      help="read each decoder layer from the local safetensors checkpoint when it is needed and write "
                           "it back compressed (host memory: a few layers, not the model); implies --offload")
    sys_.add_argument("--no_fused", action="store_true",
                      help="plain PyTorch column loop even on CUDA, launched one by one (the default there: the fused "
                           "Triton kernel, small solves replayed as CUDA graphs)")
    sys_.add_argument("--quiet", action="store_true", help="only errors and the final results")
    sys_.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The command line as a RunConfig (not yet checked: pipeline.checks.validate)."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug")  # read by pipeline.cli.main from the command line itself, so that it covers parsing too
    return RunConfig(**args)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a usage error, before any work; 1 a failed run; 130/143 interrupted (README.md)."""
    return cli.main(sys.argv[1:] if argv is None else argv, parse_args, __file__)


if __name__ == "__main__":
    code = main()
    # Every output is written and closed by now. The interpreter's own exit would tear down torch, CUDA and
    # every module (1.5-2 s after an OPT-1.3B run, benchmarks/speed.md) and could be interrupted halfway by a
    # second Ctrl-C; ending the process at once does neither.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
