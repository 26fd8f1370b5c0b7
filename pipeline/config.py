"""Every setting of a run in one place: `RunConfig` (what the command line sets, with its defaults: the only
ones) and the rules derived from it, among them `SolveSettings`, the one object every solve is made with.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from mixed import precision
from mixed.precision import ClipSearch, MixedPrecision
from sparsegpt_enhanced import SOLVE_ORDERS, PruneSpec, SolveSettings

EVAL_DATASETS = ("wikitext2", "ptb", "c4")
# The values each enumerated setting takes: the flags' choices, and what checks.validate holds a RunConfig to.
CHOICES = {
    "bit_method": ("quantile", "budget"),
    "bit_scope": ("auto", "layer", "model"),
    "bit_granularity": ("channel", "linear"),
    "clip": ("auto", "none", "width"),
    "clip_objective": ("solver", "uncompensated", "solve"),
    "clip_search": ("auto", "full", "once", "fast"),
    "row_ranges": ("dense", "search"),
    "shrinkage_mean": ("per_channel", "per_weight"),
    "channel_cost": ("weighted", "error"),
    "solve_order": ("auto", *SOLVE_ORDERS),
}
SOLVE_ORDER_FLAGS = ("auto", "stored", "act")  # --solve_order's choices; narrow_first lost (no flag)


class UsageError(ValueError):
    """A bad flag combination: reported in one line before any work starts."""


@dataclass
class RunConfig:
    """Every setting of a run (the CLI flags), saved with its results."""

    model: str
    dataset: str
    seed: int = 0
    nsamples: int = 128
    percdamp: float = 0.01
    sparsity: float = 0.0
    prunen: int = 0
    prunem: int = 0
    blocksize: int = 128
    gmp: bool = False
    wbits: int = 16
    minlayer: int = -1
    maxlayer: int = 1000
    prune_only: str = ""
    invert: bool = False
    solve_order: str = "auto"  # auto: by the run (solve_order_as_run)
    save: str = ""
    export: str = ""
    export_format: str = "packed"
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str = ""
    groupsize: int = -1
    sym: bool = False
    nearest: bool = False
    seqlen: int = 0
    data_dir: str | None = None
    cache_dir: str | None = None
    results_json: str = ""
    plot: str = ""
    target_avg_bits: float | None = None
    bit_method: str = "quantile"
    bit_scope: str = "auto"  # auto: model when the whole model is on the device, else layer (allocation_scope)
    bit_granularity: str = "channel"
    clip: str = "auto"
    clip_objective: str = MixedPrecision.clip_objective
    clip_min: float = precision.CLIP_MIN
    clip_search: str = "auto"  # auto: by the device (clip_search_as_run)
    row_ranges: str = "dense"
    error_shrinkage: float | None = None  # None: the method's (precision.ERROR_SHRINKAGE)
    bit_options: list[int] | None = None  # None: the allocator's (allowed_widths)
    importance_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    eval: list[str] = field(default_factory=lambda: list(EVAL_DATASETS))
    batch_size: int = 8
    device: str = ""
    gpus: int = 0  # processes, one GPU each (0: as launched, one without torchrun)
    offload: bool = False
    stream: bool = False
    overlap: bool = True  # offloaded layers move behind the computation (offload.py); False: in line
    no_fused: bool = False
    quiet: bool = False
    # Settings of the variants that lost on validation text (benchmarks/mixed_precision.md): no flag; experiments set them
    # (dataclasses.replace), e.g. solve_order "narrow_first".
    sensitivity_shrinkage: float = MixedPrecision.sensitivity_shrinkage
    shrinkage_mean: str = MixedPrecision.shrinkage_mean
    channel_cost: str = MixedPrecision.channel_cost
    clip_sample_rows: int = MixedPrecision.clip_sample_rows
    # Model scope: calibration windows the loss-sensitivity pass runs on (the first ones, of each process's share under
    # torchrun; 0: all). Unvalidated: the
    # pass costs 4 forward-equivalents of the model in fp32 (11.5 s per layer at OPT-175B width on an H100), so a
    # quarter of the windows is what the GPU's mixed-cost bar would need (configs/ablations/clip_search.txt).
    sensitivity_windows: int = 0

    @property
    def prune(self) -> PruneSpec:
        return PruneSpec(self.sparsity, self.prunen, self.prunem)

    @property
    def quantize(self) -> bool:
        return self.wbits < 16

    @property
    def mixed(self) -> bool:
        return self.target_avg_bits is not None

    @property
    def solve_order_as_run(self) -> str:
        """The rule for the order the solver takes a Linear's columns in (sparsegpt_enhanced.solve_order): as asked, else act
        order in mixed runs without sparsity or groups and the stored order otherwise (the reference's). With
        sparsity act order moves the masks, and narrow widths first within each mask block lowers the layer
        error yet loses on validation text (benchmarks/mixed_precision.md)."""
        if self.solve_order != "auto":
            return self.solve_order
        mixed_dense = self.mixed and not self.prune.active and self.groupsize <= 0 and not (self.gmp or self.nearest)
        return "act" if mixed_dense else "stored"

    @property
    def solve_settings(self) -> SolveSettings:
        """What every solve, cost estimate and clip search of the run is made with: one object, made here."""
        return SolveSettings(self.prune, self.sym, self.groupsize, self.blocksize, self.percdamp,
                             self.solve_order_as_run, not self.no_fused)

    @property
    def solve_device(self) -> str:
        """Where the layers are solved: --device, else CUDA where there is one (placement.run_device)."""
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def clip_search_as_run(self) -> str:
        """--clip_search as asked, else "once" where the layers are solved on a CPU and "full" elsewhere. On a CPU
        the solve's second search (on the compressed model's inputs) was a third of a mixed run and bought nothing
        on validation text there (benchmarks/mixed_cost.md); the GPU's defaults were chosen with "full"."""
        if self.clip_search != "auto":
            return self.clip_search
        return "once" if self.solve_device.startswith("cpu") else "full"

    @property
    def uniform_clip_search(self) -> ClipSearch:
        """How a uniform run with --clip width chooses its range factors (mixed runs: `mixed_precision`)."""
        return ClipSearch.named(self.clip_search_as_run, precision.clip_factors(self.clip_min), self.clip_objective,
                                self.clip_sample_rows)

    @property
    def clipped(self) -> bool:
        """Whether widths get a shrunk range: asked for, or by default in mixed runs."""
        return self.clip == "width" or (self.clip == "auto" and self.mixed)

    @property
    def allowed_widths(self) -> list[int]:
        """--bit_options, else the widths the allocator chooses from by default (precision.default_options)."""
        if self.bit_options is not None:
            return list(self.bit_options)
        if not self.mixed:
            return list(precision.BIT_OPTIONS)
        return list(precision.default_options(self.bit_method, self.bit_granularity, self.bit_scope,
                                             self.target_avg_bits, self.prune.active, self.wbits))

    @property
    def mixed_precision(self) -> MixedPrecision:
        return MixedPrecision(self.target_avg_bits, tuple(self.allowed_widths), self.bit_method,
                              self.bit_granularity, tuple(self.importance_weights), self.error_shrinkage,
                              clip=self.clipped, clip_factors=precision.clip_factors(self.clip_min),
                              clip_objective=self.clip_objective, clip_search_kind=self.clip_search_as_run,
                              sensitivity_shrinkage=self.sensitivity_shrinkage, shrinkage_mean=self.shrinkage_mean,
                              channel_cost=self.channel_cost, clip_sample_rows=self.clip_sample_rows)

    def selected(self, layer: int, name: str) -> bool:
        """The reference's --minlayer/--maxlayer/--prune_only/--invert filter."""
        inside = self.minlayer <= layer < self.maxlayer and self.prune_only in name
        return inside != self.invert


def config_defaults() -> dict[str, Any]:
    """Every RunConfig field's default (a fresh copy of the lists)."""
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(RunConfig)
            if f.default is not MISSING or f.default_factory is not MISSING}
