"""The serving layout (serving/layout.py) and QuantLinear's CPU path, in plain torch: the packing's bit
positions and round trips, the permutation, the memory prediction, and products against an independent
oracle -- the weights quant.py dequantizes from the same codes, multiplied in float64."""
from __future__ import annotations

import pytest
import torch

from quant import QuantGrid, dequantize
from serving.layout import (PACKINGS, PANEL_UNITS, WIDTHS, build_layout, dequantized_weight, pack_units,
                            permute_activations, predicted_bytes, unpack_units)
from serving.qlinear import QuantLinear, quantized_bytes, swap_linears


def compressed(rows: int, columns: int, widths: list[int], sym: bool, groupsize: int, prune: float = 0.0,
               seed: int = 0, shrink: dict[int, float] | None = None):
    """(codes, bits, keep, grid, reference weight): random weights rounded on a QuantGrid, as a compression
    leaves them; the reference is quant.dequantize of the codes, pruned entries 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g) * 0.05
    if prune:
        w[torch.rand(rows, columns, generator=g) < prune] = 0.0
    bits = torch.tensor(widths)[torch.randint(0, len(widths), (columns,), generator=g)]
    grid = QuantGrid.rounding(w, sym, groupsize, shrink=shrink if shrink is not None else {2: 0.85, 3: 0.92})
    codes, scale, zero = grid.codes_of(w, bits)
    keep = (w != 0) if prune else None
    ref = dequantize(codes, scale, zero)
    if keep is not None:
        ref = torch.where(keep, ref, 0.0)
    return codes, bits, keep, grid, ref


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", WIDTHS)
def test_units_round_trip_every_code_value(bits):
    spec = PACKINGS[bits]
    assert spec.codes_per_unit * bits == 32 * spec.words_per_unit  # nominal bits, nothing wasted
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (5, 7, spec.codes_per_unit), generator=g)
    codes[0, 0] = 2 ** bits - 1  # all ones: every bit of the unit set, the sign bit of each word too
    planes = pack_units(codes, bits)
    assert planes.dtype == torch.int32 and planes.shape == (spec.words_per_unit, 7, 5)
    assert torch.equal(unpack_units(planes, bits), codes)
    assert bool((planes[:, 0, 0] == -1).all())


def test_three_bit_unit_bit_positions():
    """The documented format, bit by bit: 10 codes per word, codes 30 and 31 in the words' top two bits."""
    codes = torch.zeros(1, 1, 32, dtype=torch.int64)
    codes[0, 0, 0] = 5  # word 0, bits 0-2
    codes[0, 0, 13] = 6  # word 1, bits 9-11
    codes[0, 0, 30] = 0b101  # bits 0,1 -> word 0 bits 30,31; bit 2 -> word 1 bit 30
    codes[0, 0, 31] = 0b110  # bit 0 -> word 1 bit 31; bits 1,2 -> word 2 bits 30,31
    words = pack_units(codes, 3)[:, 0, 0].to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [5 | (1 << 30), (6 << 9) | (1 << 30), (1 << 30) | (1 << 31)]


def test_six_bit_spare_code_spans_three_words():
    codes = torch.zeros(1, 1, 16, dtype=torch.int64)
    codes[0, 0, 15] = 0b100111  # bits 0,1 -> word 0; bits 2,3 -> word 1; bits 4,5 -> word 2 (bits 30, 31)
    codes[0, 0, 4] = 63  # word 0, bits 24-29
    words = pack_units(codes, 6)[:, 0, 0].to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [(63 << 24) | (3 << 30), 1 << 30, 1 << 31]


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("widths, sym, groupsize, prune", [
    (list(WIDTHS), False, 0, 0.3),
    (list(WIDTHS), True, 128, 0.0),
    ([4], False, 128, 0.0),
    ([3, 6], True, 0, 0.5),
])
def test_layout_dequantizes_to_quant_py_weights(widths, sym, groupsize, prune):
    codes, bits, keep, grid, ref = compressed(24, 400, widths, sym, groupsize, prune)
    layout = build_layout(codes, bits, keep, grid)
    w = dequantized_weight(layout)
    # per-row spans are fp32, grouped ones fp16 (scale within 2**-11 relatively)
    tol = 1e-6 if layout.groups == 1 else 2.0 ** -10
    assert torch.allclose(w, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    if keep is not None:
        assert bool((w[~keep] == 0).all())  # pruned weights are their zero point's code: exactly 0


def test_permutation_buckets_hold_each_column_once_in_order():
    codes, bits, keep, grid, _ = compressed(8, 333, list(WIDTHS), False, 0)
    layout = build_layout(codes, bits, keep, grid)
    perm = layout.perm.to(torch.int64)
    assert sorted(perm[perm >= 0].tolist()) == list(range(333))
    for bucket in layout.buckets:
        stretch = perm[bucket.x_offset:bucket.x_offset + bucket.positions]
        cols = stretch[stretch >= 0]
        assert bool((bits[cols] == bucket.bits).all()) and cols.numel() == bucket.columns
        # slot run (panel, c) = positions [c*16, c*16+16) of the panel: consecutive bucket columns
        per_panel = PANEL_UNITS * PACKINGS[bucket.bits].codes_per_unit
        runs = stretch.view(bucket.panels, PACKINGS[bucket.bits].codes_per_unit, PANEL_UNITS)
        valid = runs[runs >= 0]
        assert torch.equal(valid, torch.sort(cols).values)  # ascending: runs in panel, slot, unit order
        assert bucket.positions == bucket.panels * per_panel
    x = torch.randn(3, 333)
    xp = permute_activations(x, layout.perm)
    assert torch.equal(xp[:, perm >= 0], x[:, perm[perm >= 0]]) and bool((xp[:, perm < 0] == 0).all())


def test_group_modes():
    assert build_layout(*compressed(16, 512, [4], False, 128)[:4]).group_mode == 1  # slot runs inside groups
    assert build_layout(*compressed(16, 512, [2, 3, 4], False, 128)[:4]).group_mode == 2  # runs straddle groups
    assert build_layout(*compressed(16, 512, [2, 3, 4], False, 0)[:4]).group_mode == 0


def test_memory_prediction_formula_and_what_is_stored():
    rows, columns = 512, 2048
    codes, bits, keep, grid, _ = compressed(rows, columns, list(WIDTHS), False, 0)
    layout = build_layout(codes, bits, keep, grid)
    k = {b: int((bits == b).sum()) for b in WIDTHS}
    expected = rows * sum(k[b] * b for b in WIDTHS) // 8 + rows * 4 + rows * 5  # codes, fp32 spans, uint8 zeros
    assert layout.predicted_bytes() == expected == predicted_bytes(rows, k, 1, False)
    assert 1.0 <= layout.stored_bytes() / layout.predicted_bytes() < 1.03
    g = build_layout(*compressed(rows, columns, [4], True, 128)[:4])  # sym g128: fp16 spans, no zeros
    assert g.predicted_bytes() == rows * columns // 2 + rows * 16 * 2 and g.zeros is None


def test_layout_rejects_unsupported_widths():
    codes, bits, keep, grid, _ = compressed(4, 32, [5], False, 0)
    with pytest.raises(ValueError, match="widths"):
        build_layout(codes, bits, keep, grid)


# ---------------------------------------------------------------- QuantLinear on the CPU


@pytest.mark.parametrize("widths, sym, groupsize, prune", [
    (list(WIDTHS), False, 0, 0.4), (list(WIDTHS), True, 128, 0.0), ([2, 8], False, 64, 0.2)])
def test_quant_linear_cpu_matches_float64_oracle(widths, sym, groupsize, prune):
    codes, bits, keep, grid, ref = compressed(40, 300, widths, sym, groupsize, prune, seed=3)
    bias = torch.randn(40).half()
    module = QuantLinear.from_codes(codes, bits, keep, grid, bias)
    assert not any(p.dtype.is_floating_point and p.shape == (40, 300) for p in module.buffers())  # no weight copy
    x = torch.randn(2, 5, 300).half()
    y = module(x)
    oracle = x.double() @ ref.double().t() + bias.double()
    assert y.shape == (2, 5, 40) and y.dtype == torch.float16
    assert float((y.double() - oracle).norm() / oracle.norm()) < 2e-3


def test_swap_linears_in_a_transformers_model():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0)
    model = OPTForCausalLM(cfg).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    layers, reference = {}, {}
    for i, name in enumerate(names):
        w = model.get_submodule(name).weight.detach()
        bits = torch.tensor(list(WIDTHS))[torch.randint(0, 5, (w.shape[1],))]
        grid = QuantGrid.rounding(w, False, 0)
        codes, scale, zero = grid.codes_of(w, bits)
        layers[name] = (codes, bits, None, grid)
        reference[name] = dequantize(codes, scale, zero)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        for name, w in reference.items():
            model.get_submodule(name).weight.copy_(w)
        expected = model(ids).logits
        swapped = swap_linears(model, layers)
        got = model(ids).logits
    assert set(swapped) == set(names) and all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    stored, predicted = quantized_bytes(swapped.values())
    assert stored >= predicted > 0


def test_a_packed_export_linear_builds_the_layout(tmp_path):
    """The packed checkpoint's codes (format v1), read back (formats.packed.read_linear), rebuild the same weights
    through the serving layout, within its scales' rounding."""
    import json

    import safetensors.torch
    from safetensors import safe_open

    from formats.packed import pack_linear, read_linear

    codes, bits, keep, grid, ref = compressed(12, 96, list(WIDTHS), False, 32, prune=0.3)
    weight = ref.clone()
    tensors, layout_json = pack_linear("l", weight, grid, bits, pruned=True, n_options=5)
    path = tmp_path / "p.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"layers": json.dumps({"l": layout_json})})
    with safe_open(str(path), "pt") as f:
        read = read_linear(f, "l", layout_json)
    assert torch.equal(read.weight(), weight)
    layout = build_layout(read.codes, read.bits, read.keep, read.grid)
    assert torch.allclose(dequantized_weight(layout), weight, rtol=2.0 ** -10, atol=2.0 ** -10 * 0.2)
