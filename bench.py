"""Benchmark: time and peak GPU memory per stage, for many configurations in one process.

    python bench.py MODEL --configs FILE [--data_dir DIR] [--compress-only] [--json OUT]
    python bench.py --synthetic opt-6.7b [--layers N] [--offload | --stream] [--stages | --no-overlap] [--repeat K] [--json OUT] [-- FLAGS]
    python bench.py --factor 4096 12288 49152 [--json OUT]

FILE has one configuration per line, `name|flags` (the flags of opt_enhanced.py, without the model);
`--dataset` defaults to c4. Each configuration loads the model afresh; tokenized data is memoised, so
`tokenize` is only paid by the first configuration (and by none with a warm --cache_dir).

--synthetic builds a random-weight fp16 OPT with the named model's shapes (no download) and times
the full compression path (pipeline.compress) on random calibration tokens (default 128 x 2048,
50% + 4-bit; any opt_enhanced flags after --, mixed precision too: `-- --device cpu --nsamples 4 --seqlen 32`
for a CPU smoke test at the opt-tiny shape). --repeat K builds and compresses K times in one process: the
first is the cold one (CUDA and cuBLAS start, Triton compiles or loads its kernels), the others are warm. It
prints each layer's wall time inside compress (from when the walk takes the layer to when it takes the
next) and the median of the inner layers, the steady per-layer time: with --offload the next layer comes in
and the last one goes home behind the computation (systems/offload.py), which neither the first layer's
arrival nor the last one's return can be; --no-overlap moves them in line, to measure what the overlap saves.
--stream makes each layer's weights when the walk reaches it (a copy of one random template layer) and drops
them after, as opt_enhanced --stream reads them from safetensors: the peak host RSS is then that of a few
layers, not of the model. --stages also times compress's named stages in each layer (hessians, costs,
clip, allocate, factor, solve; the layer's forward and moves are the `rest`) and, before the first layer,
model scope's sensitivity pass and planning, synchronising the GPU around each stage, so the stages add up to
a little more than compress takes. Both report peak GPU memory and the process's peak host RSS.

Under torchrun (`torchrun --standalone --nproc_per_node 2 bench.py --synthetic opt-1.3b`), --synthetic
compresses on every process as opt_enhanced does there (systems/distributed.py): each builds the same model on
its own GPU; rank 0 prints, with every process's peak GPU and host memory.

--factor times SparseGPT.inverse_factor against the published three-step factor (Cholesky,
cholesky_inverse, Cholesky of the inverse) on a random Hessian of each size, with peak GPU memory
above X^T X and the two factors' relative difference. On the CPU sizes above 2048 are skipped.
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch

import opt_enhanced
from families import decoder_of
from modelutils import decoder_layers, home_of, submodule
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import EVAL_DATASETS
from pipeline.placement import place
from pipeline.run import run
from sparsegpt_enhanced import SparseGPT
from systems import cholesky, distributed, streaming
from systems import offload as offload_module
from systems.atomic_io import write_json
from systems.progress import Log, Stages

# hidden, layers, heads, ffn of the published OPT models, opt-tiny (no such model) for smoke tests on the CPU, and
# opt-mini's shape for its stage timings
SHAPES = {"opt-125m": (768, 12, 12, 3072), "opt-1.3b": (2048, 24, 32, 8192), "opt-6.7b": (4096, 32, 32, 16384),
          "opt-13b": (5120, 40, 40, 20480), "opt-175b": (12288, 96, 96, 49152), "opt-tiny": (64, 2, 4, 256),
          "opt-mini": (384, 8, 6, 1536)}  # ../shared's opt-mini (its vocabulary 8,192, here OPT's 50,272)
CPU_FACTOR_MAX = 2048  # --factor on the CPU: larger sizes take minutes on the development machine

STAGES = ("load", "tokenize", "compress", "evaluate", "total")


def read_configs(path: str) -> list[tuple[str, list[str]]]:
    configs = []
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, flags = line.partition("|")
            configs.append((name.strip(), shlex.split(flags)))
    return configs


def row(name: str, res: dict) -> str:
    ppl = res["perplexity"]
    s = res["summary"] or {}
    t = res["timings"]
    mem = max(res["peak_gpu_gib"].values(), default=0.0)
    cells = [f"{ppl.get(d, float('nan')):8.2f}" for d in EVAL_DATASETS]
    cells += [f"{s.get(k, 16):5.3f}" for k in ("avg_bits_weighted", "stored_bits", "effective_bits")]
    cells += [f"{t.get(k, 0):7.2f}" for k in STAGES] + [f"{mem:6.2f}"]
    return f"| {name:18s} | " + " | ".join(cells) + " |"


def host_peak_gib() -> float:
    """The process's peak resident host memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build_synthetic(name: str, layers: int | None, dev: torch.device, offload: bool, stream: bool = False
                    ) -> tuple[torch.nn.Module, float]:
    """(a random-weight fp16 OPT of the named shape placed as a run places it, seconds it took). With
    `stream`, only the non-layer modules and one random template layer are made (SyntheticStore)."""
    from transformers import OPTConfig, OPTForCausalLM

    hidden, nlayers, heads, ffn = SHAPES[name]
    shape = OPTConfig(hidden_size=hidden, num_hidden_layers=1 if stream else layers or nlayers,
                      num_attention_heads=heads, ffn_dim=ffn, word_embed_proj_dim=hidden, vocab_size=50272,
                      max_position_embeddings=2048, dropout=0.0)
    tick = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(dev):
            model = OPTForCausalLM(shape).eval()
        if stream:
            SyntheticStore.attach(model, layers or nlayers)
    finally:
        torch.set_default_dtype(torch.float32)
    place(model, dev, offload)
    return model, time.time() - tick


class SyntheticStore(streaming.LayerStore):
    """--synthetic --stream: each decoder layer's weights are made when the walk reaches it and freed
    after it (nothing is kept), as a streamed run reads them from safetensors. A layer is a copy of one
    random template layer held in host memory: copying runs at the speed of reading a file in the page
    cache, where drawing a 175B-width layer's 1.8 G random numbers on the CPU would take longer than
    compressing it."""

    def __init__(self, template: dict[str, torch.Tensor], prefix: str, layers: int) -> None:
        super().__init__(prefix, [{} for _ in range(layers)])
        self.template = template

    def load(self, index: int, layer: torch.nn.Module) -> None:
        layer.load_state_dict({n: t.clone() for n, t in self.template.items()}, strict=True, assign=True)

    @classmethod
    def attach(cls, model: torch.nn.Module, layers: int) -> None:
        """Turn a one-layer model into a streamed one of `layers` layers, its only layer the template."""
        from accelerate import init_empty_weights

        decoder = decoder_layers(model)
        template = {n: t.to("cpu") for n, t in decoder[0].state_dict().items()}
        kind = type(decoder[0])
        model.config.num_hidden_layers = layers
        with init_empty_weights(include_buffers=False):
            skeleton = [kind(model.config, layer_idx=i) for i in range(layers)]
        path = decoder_of(model).layers
        parent, _, attribute = path.rpartition(".")
        setattr(submodule(model, parent), attribute, torch.nn.ModuleList(skeleton))  # the template's copy goes
        model.layer_store = cls(template, path + ".", layers)


class LayerClock(Log):
    """A quiet Log whose progress bar notes when the walk takes each layer, for per-layer wall times of
    compress itself: a layer's time runs from when the walk takes it to when it takes the next (its
    arrival, the solves, the forward, and handing it back; with overlap, what of the moves the
    computation did not hide), the last layer's to the end of compress (its copy home included).

    With `timed_stages` on a device, it also times compress's named stages (Log.stage: hessians, costs,
    allocate, factor, solve, ...; model scope's sensitivity pass and planning before the first layer),
    synchronising the device around each, per layer: the stages then add up to a little more than compress
    takes without them."""

    def __init__(self, timed_stages: torch.device | None = None) -> None:
        super().__init__(True)
        self.starts: list[float] = []
        self.end = 0.0
        self.device = timed_stages
        self.per_layer: list[dict[str, float]] = [{}]  # [0]: before the first layer (model scope's planning)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        sync()
        tick = time.perf_counter()
        try:
            yield
        finally:
            sync()
            record = self.per_layer[-1]
            record[name] = record.get(name, 0.0) + time.perf_counter() - tick

    def stage(self, name: str):
        return self._timed(name) if self.device is not None else super().stage(name)

    def bar(self, iterable, total: int, desc: str):
        for item in iterable:
            self.starts.append(time.perf_counter())
            self.per_layer.append({})
            yield item
        self.end = time.perf_counter()

    def report(self) -> dict[str, Any]:
        ends = self.starts[1:] + [self.end or time.perf_counter()]
        walls = [b - a for a, b in zip(self.starts, ends)]
        inner = sorted(walls[1:-1])  # neither the first layer's unhidden fetch nor the last one's copy home
        steady = inner[len(inner) // 2] if inner else None
        res: dict[str, Any] = {"per_layer_wall_s": walls, "steady_layer_s": steady}
        if self.device is not None:
            totals: dict[str, float] = {}
            for record in self.per_layer:
                for name, seconds in record.items():
                    totals[name] = totals.get(name, 0.0) + seconds
            res.update(stage_s=totals, before_layers_s=self.per_layer[0] if self.starts else {},
                       per_layer_stage_s=self.per_layer[1:] if self.starts else [])
        return res


def layer_wall_line(res: dict[str, Any]) -> str:
    """One line of a non-staged run's per-layer wall seconds and the steady (inner layers') median."""
    walls = ", ".join(f"{i}: {s:.2f}" for i, s in enumerate(res["per_layer_wall_s"]))
    steady = res["steady_layer_s"]
    tail = f"; steady per layer {steady:.2f} s (median of layers 1..{len(res['per_layer_wall_s']) - 2})" \
        if steady is not None else "; --layers 3 or more for a steady per-layer time"
    return f"per-layer wall s (overlap {'on' if res['overlap'] else 'off'}): {walls}{tail}"


@dataclass(frozen=True)
class SyntheticRun:
    """What `synthetic` compresses and how: a random-weight OPT of a published shape (SHAPES), `layers` of its
    decoder layers (None: all), offloaded (the layers on the CPU), streamed (each layer made when reached and
    dropped after), with opt_enhanced `flags` (default 50% + 4-bit), `repeat` times in one process."""

    shape: str
    layers: int | None = None
    offload: bool = False
    stream: bool = False
    stages: bool = False  # time compress's named stages per layer (LayerClock)
    overlap: bool = True  # offloaded layers move behind the computation
    repeat: int = 1
    flags: tuple[str, ...] = ("--sparsity", "0.5", "--wbits", "4")


def synthetic(spec: SyntheticRun) -> dict:
    """Compression of a random-weight OPT of the given shape through pipeline.compress: seconds, peak GPU and host
    memory, each layer's wall time, and with `stages` the time of each named stage per layer. The first of
    `repeat` runs is the cold one (CUDA and cuBLAS start, Triton compiles or loads its kernels)."""
    nlayers = SHAPES[spec.shape][1]
    flags = [*spec.flags, *([] if spec.overlap else ["--no-overlap"])]
    cfg = opt_enhanced.parse_args(["synthetic", "c4", "--quiet", *flags])
    dev = distributed.local_device(torch.device(cfg.device or "cuda"))
    torch.set_float32_matmul_precision("highest")  # as pipeline.run.run sets it
    seqlen = cfg.seqlen or 2048
    runs = []
    for _ in range(spec.repeat):
        model, built = build_synthetic(spec.shape, spec.layers, dev, spec.offload or spec.stream, spec.stream)
        calibration = torch.randint(0, model.config.vocab_size, (cfg.nsamples, seqlen),
                                    generator=torch.Generator().manual_seed(0))
        run: dict[str, Any] = {"build_s": built, "host_peak_after_build_gib": host_peak_gib()}
        stage = Stages(dev)
        clock, moves = LayerClock(dev if spec.stages else None), offload_module.MoveStats()
        with stage("compress"):
            done = compress(model, calibration, cfg, dev, clock, moves)
        run.update(compress_s=stage.seconds["compress"], solver_s=sum(s.seconds for s in done.stats),
                   peak_gpu_gib=stage.peak_gib.get("compress", 0.0), **clock.report(),
                   overlap=cfg.overlap and offload_module.streams_for(home_of(decoder_layers(model)), dev) is not None,
                   moves=[(event, i, round(t - clock.starts[0], 3)) for (event, i), t in zip(moves.log, moves.times)])
        run["per_layer_s"] = run["compress_s"] / model.config.num_hidden_layers
        run["host_peak_gib"] = host_peak_gib()
        if distributed.size() > 1:
            run["by_process"] = distributed.gather({"peak_gpu_gib": run["peak_gpu_gib"],
                                                    "host_peak_gib": run["host_peak_gib"]})
        runs.append(run)
        params = sum(p.numel() for p in model.parameters())
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    first = runs[0]
    return {"shape": spec.shape, "layers": spec.layers or nlayers, "of": nlayers, "offload": spec.offload or spec.stream,
            "stream": spec.stream, "stages": spec.stages, "flags": flags, "processes": distributed.size(), **first,
            "runs": runs if spec.repeat > 1 else None, "params": params,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


class StageClock:
    """Seconds and peak GPU memory of named stages, summed (seconds) or maxed (memory) over repeats."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    @contextmanager
    def __call__(self, name: str, into: dict[str, float] | None = None) -> Iterator[None]:
        """Time a stage; its seconds are also added to `into[name]` (a per-size record)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        tick = time.perf_counter()
        yield
        self.sync()
        seconds = time.perf_counter() - tick
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if into is not None:
            into[name] = into.get(name, 0.0) + seconds
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.dev) / 2 ** 30
            self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), peak)


def stage_table(res: dict[str, Any]) -> str:
    """The per-layer stage seconds of a --stages run as a Markdown table (`rest`: the layer's wall time outside
    the named stages: its forward for the next layer and its moves), then the stages before the first layer
    (model scope's sensitivity pass and planning)."""
    names = sorted({n for layer in res["per_layer_stage_s"] for n in layer})
    lines = ["| layer | " + " | ".join(names) + " | rest | wall |", "|---" * (len(names) + 3) + "|"]
    for i, (layer, wall) in enumerate(zip(res["per_layer_stage_s"], res["per_layer_wall_s"])):
        rest = wall - sum(layer.values())
        lines.append(f"| {i} | " + " | ".join(f"{layer.get(n, 0.0):.3f}" for n in names) + f" | {rest:.3f} | {wall:.3f} |")
    before = ", ".join(f"{k} {v:.2f} s" for k, v in res["before_layers_s"].items())
    lines.append(f"before the first layer: {before or 'nothing'}; compress {res['compress_s']:.2f} s; peak GPU "
                 f"{res['peak_gpu_gib']:.1f} GiB; peak host RSS {res['host_peak_gib']:.1f} GiB")
    return "\n".join(lines)


def three_step_factor(solver: SparseGPT, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The published factor (no dead channels here): Cholesky of the damped H, cholesky_inverse,
    upper Cholesky of the inverse; each n x n intermediate dropped as soon as the next exists."""
    H = solver.hessian
    H.diagonal().add_(percdamp * torch.mean(H.diagonal()))
    L, _ = torch.linalg.cholesky_ex(H)
    del H
    inverse = torch.cholesky_inverse(L)
    del L
    U, _ = torch.linalg.cholesky_ex(inverse, upper=True)
    return U, inverse.diagonal().clone()


def identity_solve_factor(solver: SparseGPT, percdamp: float) -> torch.Tensor:
    """The one-Cholesky factor with its triangular inverse as one solve against the identity (no recursion):
    what `inverse_factor` does below TRIANGULAR_LEAF, timed at every size (no dead channels here)."""
    H = solver.hessian.flip(0, 1)
    H.diagonal().add_(percdamp * torch.mean(H.diagonal()))
    L, _ = torch.linalg.cholesky_ex(H)
    del H
    return cholesky.inverse_factor_from_reversed_cholesky(L, leaf=L.shape[0])[0]


def random_hessian(n: int, dev: torch.device, tokens: int) -> SparseGPT:
    """X^T X of `tokens` random fp16 tokens with correlated channels (a common factor), as add_batch
    sees layer inputs, in slices of 8192 tokens."""
    solver = SparseGPT(n, dev)
    g = torch.Generator(dev).manual_seed(0)
    common = torch.randn(n, device=dev, generator=g)
    for start in range(0, tokens, 8192):
        rows = min(8192, tokens - start)
        x = torch.randn(rows, n, device=dev, generator=g) + torch.randn(rows, 1, device=dev, generator=g) * common
        solver.add_batch(x.half() if dev.type == "cuda" else x)
    return solver


def factor_bench(sizes: list[int], dev: torch.device, percdamp: float = 0.01, repeats: int = 2) -> list[dict]:
    """Seconds (best of `repeats`) and peak GPU memory (above what is held before: X^T X, and the
    three-step factor while the others run) of the three-step factor, the shipped one, and the
    shipped one with one triangular solve against the identity instead of the recursive inverse
    (what a larger TRIANGULAR_LEAF trades), per size, with their relative (Frobenius) difference."""
    torch.set_float32_matmul_precision("highest")
    clock = StageClock(dev)
    rows = []
    for n in [256] + sizes:  # 256 first: cuSOLVER and cuBLAS start there, untimed
        if dev.type != "cuda" and n > CPU_FACTOR_MAX:
            print(f"--factor: skipping n={n} on the CPU", file=sys.stderr)
            continue
        solver = random_hessian(n, dev, 2 * n)
        row: dict[str, Any] = {"n": n, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
        methods = {
            "three_step": lambda s=solver: three_step_factor(s, percdamp)[0],
            "one_cholesky": lambda s=solver: s.inverse_factor(percdamp).upper,
            "one_cholesky_identity_solve": lambda s=solver: identity_solve_factor(s, percdamp),
        }
        factors = {}
        for method, fn in methods.items():
            best, peak = float("inf"), 0.0
            for _ in range(repeats):
                solver._factors.clear()
                factors.pop(method, None)
                held = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                seconds: dict[str, float] = {}
                with clock(method, seconds):
                    factors[method] = fn()
                best = min(best, seconds[method])
                if dev.type == "cuda":
                    peak = max(peak, (torch.cuda.max_memory_allocated(dev) - held) / 2 ** 30)
            row[f"{method}_s"] = best
            if dev.type == "cuda":
                row[f"{method}_peak_gib"] = peak  # above what was held before: X^T X and the factors kept
            if method != "three_step":
                solver._factors.clear()
                row[f"{method}_relative_difference"] = (
                    torch.linalg.matrix_norm(factors.pop(method) - factors["three_step"])
                    / torch.linalg.matrix_norm(factors["three_step"])).item()
        row["damping"] = solver.inverse_factor(percdamp).percdamp
        del solver, factors, methods
        if n in sizes:
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("--configs")
    p.add_argument("--synthetic", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="--synthetic: build only this many decoder layers")
    p.add_argument("--offload", action="store_true", help="--synthetic: keep the model on the CPU")
    p.add_argument("--stages", action="store_true",
                   help="--synthetic: time each named stage of compress per layer (the GPU synchronised around each)")
    p.add_argument("--stream", action="store_true",
                   help="--synthetic: make each layer's weights when it is reached and drop them after (host "
                        "memory: a few layers; implies --offload)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="--synthetic --offload: move layers in line instead of behind the computation")
    p.add_argument("--repeat", type=int, default=1, help="--synthetic: build and compress this many times")
    p.add_argument("--factor", type=int, nargs="+", metavar="N", help="time the inverse factor at these sizes")
    p.add_argument("--device", default=None, help="--factor: the device (default cuda if available)")
    p.add_argument("--dataset", default="c4")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--json", default="", help="write every run's results here")
    p.add_argument("--compress-only", dest="evaluate", action="store_false",
                   help="--configs: time compression alone, without the perplexities (slow on a CPU)")
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []  # --synthetic: opt_enhanced flags after --
    args = p.parse_args(argv[:len(argv) - len(flags) - (1 if "--" in argv else 0)])
    if args.factor:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        res = factor_bench(args.factor, dev)
        if args.json:
            write_json(res, args.json)
        return 0
    if args.synthetic:
        dev = distributed.local_device(torch.device(opt_enhanced.parse_args(["synthetic", "c4", *flags]).device
                                                    or "cuda"))
        spec = SyntheticRun(args.synthetic, args.layers, args.offload, args.stream, args.stages, args.overlap,
                            args.repeat, tuple(flags) or SyntheticRun.flags)
        with distributed.session(dev):
            res = synthetic(spec)
        if distributed.launched_rank() != 0:
            return 0
        print(stage_table(res) if args.stages else layer_wall_line(res), flush=True)
        print(json.dumps(res), flush=True)
        if args.json:
            write_json(res, args.json)
        return 0
    if not (args.model and args.configs):
        p.error("give MODEL and --configs, --synthetic SHAPE, or --factor N ...")

    common = [args.model, args.dataset, "--quiet"]
    common += ["--data_dir", args.data_dir] if args.data_dir else []
    common += ["--cache_dir", args.cache_dir] if args.cache_dir else []
    header = ["wikitext2", "ptb", "c4", "nominal b", "stored b", "effective b"] + [f"{k} s" for k in STAGES] + ["GiB"]
    print("| config             | " + " | ".join(header) + " |", flush=True)
    print("|---" * (len(header) + 1) + "|", flush=True)
    results = {}
    for name, flags in read_configs(args.configs):
        cfg = opt_enhanced.parse_args(common + flags)
        validate(cfg)
        results[name] = run(cfg if args.evaluate else replace(cfg, eval=[]))
        print(row(name, results[name]), flush=True)
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
