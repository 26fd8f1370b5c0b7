"""What a compression run stored: per-Linear statistics, the bit counts, and the summary printed, saved and plotted.

Three averages answer different questions, and a mixed run is judged by the second:
- nominal: code bits per weight over all weights (pruned ones counted at their column's width);
- stored: code bits per *stored* weight (with sparsity the weights the mask keeps, dense all of them):
  what `--target_avg_bits` asks for, so a mixed run stores no more code bits than a uniform one;
- effective: everything the packed form holds per weight: codes (of the nonzero weights, when pruned: a
  kept weight that rounded to zero needs none), ranges, the sparsity mask, the bit map of a mixed layer
  and its range shrink factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from systems.atomic_io import atomic_file

RANGE_BITS = 64  # one fp32 (xmin, xmax) pair per row and group, the source of every width's scale/zero
SHRINK_BITS = 32  # one fp32 range factor per clipped width and layer


@dataclass
class LinearStats:
    """What one compressed Linear cost and where its bits went."""

    name: str
    rows: int
    columns: int
    groups: int
    nonzero: int  # weights left nonzero after compression
    kept: int  # weights the pruning mask keeps (all of them without sparsity): the stored ones
    pruned: bool
    bits_per_column: list[int] | None  # None: not quantized
    code_bits: int  # sum over columns of kept weights x width
    predicted_code_bits: int | None  # the same with the kept counts the allocator predicted (mixed runs)
    importance_range: tuple[float, float] | None
    error: float
    damping: float
    seconds: float
    storage_bits: int

    @property
    def avg_bits(self) -> float | None:
        return None if self.bits_per_column is None else sum(self.bits_per_column) / self.columns


def code_bits(kept_per_column: torch.Tensor, bits_per_column: torch.Tensor) -> int:
    """Bits of the codes: each stored weight at its column's width."""
    return int((kept_per_column.cpu().long() * bits_per_column.cpu().long()).sum())


def storage_bits(rows: int, kept_per_column: torch.Tensor, bits_per_column: torch.Tensor | None, groups: int,
                 pruned: bool, n_options: int, clipped_widths: int = 0) -> int:
    """Bits of the packed form of one compressed matrix: the kept codes at their column's width,
    a bitmask if pruned, a per-column bit map if widths differ, the per-row(group) ranges and
    the range factors of clipped widths."""
    columns = kept_per_column.numel()
    if bits_per_column is None:
        return 16 * rows * columns
    mask = rows * columns if pruned else 0
    mixed = len(set(bits_per_column.tolist())) > 1
    bitmap = columns * max(1, math.ceil(math.log2(n_options))) if mixed else 0
    return (code_bits(kept_per_column, bits_per_column) + mask + bitmap + RANGE_BITS * rows * groups
            + SHRINK_BITS * clipped_widths)


@dataclass
class Summary:
    channels: int
    bit_counts: dict[int, int]
    avg_bits: float  # mean over channels
    avg_bits_weighted: float  # nominal: mean over all weights (channels weighted by rows)
    stored_bits: float  # mean code width over the stored (kept) weights: what --target_avg_bits sets
    mask_drift_bits: float | None  # (stored - predicted code bits) per stored weight: the solver's mask against
    # the allocator's prediction, before the run's carry corrects it (mixed runs)
    effective_bits: float  # storage bits per weight, everything counted
    sparsity: float


def summarize(stats: list[LinearStats]) -> Summary:
    quantized = [s for s in stats if s.bits_per_column is not None]
    counts: dict[int, int] = {}
    for s in quantized:
        for b in s.bits_per_column:
            counts[b] = counts.get(b, 0) + 1
    channels = sum(s.columns for s in quantized)
    weights = sum(s.rows * s.columns for s in stats)
    qweights = sum(s.rows * s.columns for s in quantized)
    kept = sum(s.kept for s in quantized)
    mixed = [s for s in quantized if s.predicted_code_bits is not None]
    return Summary(
        channels=channels,
        bit_counts=dict(sorted(counts.items())),
        avg_bits=sum(b * c for b, c in counts.items()) / channels if channels else 0.0,
        avg_bits_weighted=sum(s.rows * sum(s.bits_per_column) for s in quantized) / qweights if qweights else 0.0,
        stored_bits=sum(s.code_bits for s in quantized) / kept if kept else 0.0,
        mask_drift_bits=sum(s.code_bits - s.predicted_code_bits for s in mixed) / sum(s.kept for s in mixed)
        if mixed else None,
        effective_bits=sum(s.storage_bits for s in stats) / weights if weights else 0.0,
        sparsity=1 - sum(s.nonzero for s in stats) / weights if weights else 0.0,
    )


def format_summary(summary: Summary, stats: list[LinearStats]) -> str:
    bar = "=" * 72
    lines = [bar, "Quantization statistics", bar,
             f"Channels: {summary.channels}", "Bit widths:"]
    for b, c in summary.bit_counts.items():
        lines.append(f"  {b}-bit: {c:8d} channels ({100 * c / summary.channels:5.1f}%)")
    lines += [
        f"Average bits: {summary.avg_bits:.3f} per channel, {summary.avg_bits_weighted:.3f} per weight "
        "(nominal)",
        f"Stored bits: {summary.stored_bits:.3f} per stored weight (the --target_avg_bits measure)"
        + ("" if summary.mask_drift_bits is None else
           f"; the solver's mask moved it {summary.mask_drift_bits:+.4f} from the allocator's prediction "
           "(carried into later Linears)"),
        f"Effective storage: {summary.effective_bits:.3f} bits per weight "
        "(codes + scales/zeros + sparsity mask + bit map)",
        f"Sparsity: {100 * summary.sparsity:.2f}%",
        "Per Linear: name, average bits, importance range",
    ]
    for s in stats:
        if s.bits_per_column is None:
            continue
        rng = "" if s.importance_range is None else f"  [{s.importance_range[0]:.3g}, {s.importance_range[1]:.3g}]"
        lines.append(f"  {s.name:48s} {s.avg_bits:5.2f}{rng}")
    lines.append(bar)
    return "\n".join(lines)


def plot_bits(stats: list[LinearStats], path: str, options: list[int]) -> None:
    """Heatmap of average bits per module (rows) and decoder layer (columns), written atomically.
    The colour scale spans the bit options, so that a layer at its target does not look extreme."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {}
    for s in stats:
        if s.bits_per_column is not None:
            layer, module = s.name.split("layers.", 1)[1].split(".", 1)
            cells[(module, int(layer))] = s.avg_bits
    modules = list(dict.fromkeys(m for m, _ in cells))
    layers = sorted({i for _, i in cells})
    grid = [[cells.get((m, i), float("nan")) for i in layers] for m in modules]
    fig, ax = plt.subplots(figsize=(3.5 + 0.6 * len(layers), 1.2 + 0.45 * len(modules)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=min(options), vmax=max(options))
    for r, row in enumerate(grid):
        for c, v in enumerate(row):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("decoder layer")
    ax.set_title("average bits per weight")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
