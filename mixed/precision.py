"""The parameters of a mixed-precision allocation (`MixedPrecision`) and the defaults chosen for them.

Every default here was chosen on validation text (benchmarks/mixed_precision.md, "What was
chosen"); experiments pass variants of `MixedPrecision`, never change these constants.
"""
from __future__ import annotations

from dataclasses import dataclass

# Range factors tried for each width (1 = the min-max range).
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


CLIP_MIN = 0.8  # the clip search's floor: chosen on validation text (benchmarks/mixed_precision.md)

# Each allocator's error shrinkage (MixedPrecision.error_shrinkage), chosen on validation text (benchmarks/mixed_precision.md):
# budget, which prices every channel by its own error curve, did best trusting the curves more (0.25 and 0.5 tied).
ERROR_SHRINKAGE = {"quantile": 0.75, "budget": 0.5}

BIT_OPTIONS = (2, 3, 4, 6, 8)  # the widths a mixed run chooses from, unless default_options narrows them


def default_options(method: str, granularity: str, scope: str, target: float, sparse: bool, base: int
                    ) -> tuple[int, ...]:
    """The widths a mixed run chooses from when --bit_options is not given: all of BIT_OPTIONS, except for budget
    per channel over the whole model (scope "model") with sparsity at 4 stored bits or more, which keeps the widths
    next to the target (those bracketing it and one more either side: 3,4,6 at 4.0) and the base width (--wbits).

    Chosen on validation text (benchmarks/mixed_precision.md "Which widths"): with 50% sparsity at 4.0, budget with all five
    widths lost to uniform 4-bit when calibrated on PTB, and 3,4,6 did better on validation in each calibration
    over seeds 0-6; at 3.0, without sparsity, in layer scope and for quantile the narrower sets lost (one width
    per Linear was not measured with them). At 3.5 the widths next to the target (2,3,4,6) were 0.16% better on
    validation over seeds 0-2 only, left at all five until more seeds say so."""
    if method != "budget" or granularity != "channel" or scope != "model" or not sparse or target < 4.0:
        return BIT_OPTIONS
    below = max(i for i, b in enumerate(BIT_OPTIONS) if b <= target)
    above = min((i for i, b in enumerate(BIT_OPTIONS) if b >= target), default=len(BIT_OPTIONS) - 1)
    near = set(BIT_OPTIONS[max(below - 1, 0):above + 2])
    return tuple(sorted(near | {base} & set(BIT_OPTIONS)))


def clip_factors(smallest: float) -> tuple[float, ...]:
    """The range factors the clip search tries, down to `smallest` (1.0 always)."""
    return tuple(f for f in CLIP_FACTORS if f >= smallest - 1e-9)


FAST_CLIP_WIDEST = 4  # --clip_search fast: the widest width searched (benchmarks/mixed_cost.md)
CLIP_SAMPLE_ROWS = 256  # rows the "solve" clip objective solves (evenly spaced; all rows of a smaller matrix)
# The clip search's solves push errors within 16-column inner blocks (SolveSettings.inner_blocksize): its stacked
# copies make tall blocks, whose rank-1 updates bound the CPU loop (benchmarks/mixed_cost.md).
SEARCH_INNER_BLOCKSIZE = 16


@dataclass(frozen=True)
class ClipSearch:
    """How each width's range factor is chosen: the factors tried (1.0 first) and the loss that picks one
    ("solve": actual solves of a sample of rows; "uncompensated", "solver": estimates; `costs.range_factors`),
    and the widest width searched (wider ones keep the min-max range)."""

    factors: tuple[float, ...]
    objective: str = "solve"
    widest: int = 8
    # In model scope, take each Linear's factors from the plan (chosen on the dense model's inputs) rather than
    # search again on the compressed model's.
    planned: bool = False
    sample_rows: int = CLIP_SAMPLE_ROWS

    @classmethod
    def named(cls, name: str, factors: tuple[float, ...], objective: str,
              sample_rows: int = CLIP_SAMPLE_ROWS) -> "ClipSearch":
        """--clip_search (as run: RunConfig.clip_search_as_run): "full" searches every width, for the model-wide plan
        and again for the solve (the GPU's default); "once" for the plan only (the CPU's default); "fast" once and
        only widths up to FAST_CLIP_WIDEST (benchmarks/mixed_cost.md)."""
        if name == "fast":
            return cls(factors, objective, widest=FAST_CLIP_WIDEST, planned=True, sample_rows=sample_rows)
        return cls(factors, objective, planned=name == "once", sample_rows=sample_rows)


@dataclass(frozen=True)
class MixedPrecision:
    """Every parameter of a mixed-precision allocation; experiments pass variants of it."""

    target: float  # average code bits per stored weight
    options: tuple[int, ...] = BIT_OPTIONS
    method: str = "quantile"  # quantile | budget
    granularity: str = "channel"  # channel | linear (one width per Linear, q/k/v tied; allocated across the model)
    importance_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    # Share of each channel's estimated error replaced by its layer's mean. The estimate sees only the
    # calibration text: channels it rarely excites look free and get 2 bits, and other text pays for that.
    error_shrinkage: float | None = None  # None: the method's (ERROR_SHRINKAGE)
    # What a channel's error is shrunk toward: its Linear's mean error per channel ("per_channel"), or its Linear's
    # mean error per stored weight times the channel's stored weights ("per_weight"). With sparsity the counts
    # differ from channel to channel; they are fixed by the mask, not by the text.
    shrinkage_mean: str = "per_channel"
    # A channel's cost at a width: importance x estimated error ("weighted"), or the estimated error alone
    # ("error"; the importance then only ranks quantile's channels).
    channel_cost: str = "weighted"
    # Model scope: share of each output's loss sensitivity (row weight) replaced by its Linear's mean. The
    # sensitivities too come from the calibration text alone.
    sensitivity_shrinkage: float = 0.0
    clip: bool = True  # shrink each width's range by the factor that minimises the estimated error
    clip_factors: tuple[float, ...] = clip_factors(CLIP_MIN)
    # Which loss picks each width's range factor: the solver's estimate (errors partly absorbed by later
    # columns), "uncompensated" (each column's error at its full cost H_jj), or "solve": the output error
    # an actual solve at that width leaves on a sample of rows (`solved_shrink`).
    clip_objective: str = "solve"
    clip_search_kind: str = "full"  # full | once | fast (ClipSearch.named)
    clip_sample_rows: int = CLIP_SAMPLE_ROWS
    drift_correction: bool = True  # carry each Linear's stored-bit surplus or deficit to the next

    @property
    def clip_search(self) -> "ClipSearch":
        return ClipSearch.named(self.clip_search_kind, self.clip_factors, self.clip_objective, self.clip_sample_rows)

    def __post_init__(self) -> None:
        if self.error_shrinkage is None:
            object.__setattr__(self, "error_shrinkage", ERROR_SHRINKAGE[self.method])
