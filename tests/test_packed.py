"""Tests of the packed export; CPU, seconds. Run: python -m pytest -q test_export.py"""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

from formats import packed
import opt_enhanced as oe
from pipeline.checks import validate
from pipeline.compress import Compressed, compress
from pipeline.config import RunConfig
from pipeline.run import run
from formats.packed import (ExportReport, export_compressed, load_compressed, pack_bits, unpack_bits,
                            write_run_record)
from conftest import tiny_model
from systems.progress import Log

OPTIONS = [2, 3, 4, 6, 8]


def compressed(model, **kw) -> Compressed:
    """`compress` on random calibration windows, as test_enhanced.run_cfg does, keeping grids and bits."""
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=8, blocksize=16, **kw)
    validate(cfg)
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    return compress(model, calib, cfg, torch.device("cpu"), Log(True))


def export_run(model, path, **kw) -> tuple[Compressed, ExportReport]:
    out = compressed(model, **kw)
    pruned = kw.get("sparsity", 0) > 0 or kw.get("prunen", 0) > 0
    report = export_compressed(model, out.grids, out.bits, str(path), pruned, len(OPTIONS),
                               lambda directory: write_run_record(directory, {"config": kw}))
    return out, report


def assert_identical(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


# ---------------------------------------------------------------- bit streams


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 13, 64, 1001])
def test_pack_unpack_round_trip(width, n):
    v = torch.randint(0, 2 ** width, (n,), generator=torch.Generator().manual_seed(width * 1000 + n))
    stream = pack_bits(v, width)
    assert stream.dtype == torch.uint8 and stream.numel() == -(-n * width // 8)
    assert torch.equal(unpack_bits(stream, width, n), v)


def test_pack_layout_is_lsb_first_and_wide_widths_work():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    v = torch.randint(0, 2 ** 16, (333,))
    assert torch.equal(unpack_bits(pack_bits(v, 16), 16, 333), v)
    with pytest.raises(ValueError, match="corrupt"):
        unpack_bits(pack_bits(v, 3), 3, 400)


# ---------------------------------------------------------------- round trips through compress


@pytest.mark.parametrize("kw", [
    dict(sparsity=0.5, wbits=4, target_avg_bits=3.5),
    dict(wbits=4),
    dict(wbits=4, groupsize=16),
    dict(prunen=2, prunem=4, wbits=3, sym=True),
    dict(sparsity=0.5, wbits=4, groupsize=16, target_avg_bits=3.0, bit_method="budget"),
    dict(wbits=4, nearest=True),
    dict(sparsity=0.5, wbits=4, minlayer=1),
    dict(sparsity=0.5, wbits=3, clip="width"),
], ids=["sparse-mixed", "uniform4", "group16", "2:4-sym", "sparse-mixed-group16", "rtn", "layer1-only", "clipped3"])
def test_export_load_is_bit_exact(tmp_path, kw):
    model = tiny_model()
    out, report = export_run(model, tmp_path / "export", **kw)
    if "target_avg_bits" in kw or "clip" in kw:  # clipped ranges travel with the export
        assert any(g.shrink for g in out.grids.values())
    assert report.layers == len(out.grids) == (6 if "minlayer" in kw else 12)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp directory left beside it
    assert {"config.json", "packed.safetensors", "dense.safetensors", "compression.json"} <= set(
        os.listdir(tmp_path / "export"))
    assert_identical(model, load_compressed(str(tmp_path / "export")))


def test_fp16_model_and_dtype_argument(tmp_path):
    model = tiny_model().half()
    export_run(model, tmp_path / "e", sparsity=0.5, wbits=4, target_avg_bits=3.5)
    loaded = load_compressed(str(tmp_path / "e"))
    assert loaded.dtype == torch.float16
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight  # tie survives
    assert_identical(model, loaded)
    as32 = load_compressed(str(tmp_path / "e"), dtype=torch.float32)
    w = "model.decoder.layers.1.fc2.weight"
    assert torch.equal(as32.state_dict()[w], model.state_dict()[w].float())


def test_packed_size_matches_storage_bits_and_beats_fp16(tmp_path):
    model = tiny_model(layers=1, hidden=256, ffn=1024, vocab=64)
    out, report = export_run(model, tmp_path / "e", sparsity=0.5, wbits=4, target_avg_bits=3.5)
    assert report.predicted_bytes == sum(s.storage_bits for s in out.stats) / 8
    # payload differs from the prediction by byte padding only: < 1 byte per stream
    streams = sum(1 for k in safetensors.torch.load_file(tmp_path / "e" / "packed.safetensors") if "xmin" not in k
                  and "xmax" not in k)
    assert 0 <= report.packed_payload_bytes - report.predicted_bytes < streams
    assert abs(report.packed_bytes / report.predicted_bytes - 1) < 0.05  # the safetensors header included
    linear_fp16 = sum(2 * s.rows * s.columns for s in out.stats)
    assert report.packed_bytes < 0.25 * linear_fp16 and report.total_bytes < report.fp16_bytes
    print(report.summary())


# ---------------------------------------------------------------- failures


def test_refuses_non_empty_directory(tmp_path):
    model = tiny_model(layers=1)
    out = compressed(model, wbits=4)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_compressed(model, out.grids, out.bits, str(tmp_path / "e"), False, len(OPTIONS))
    assert os.listdir(tmp_path / "e") == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    export_compressed(model, out.grids, out.bits, str(tmp_path / "empty"), False, len(OPTIONS))
    assert_identical(model, load_compressed(str(tmp_path / "empty")))


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model(layers=1)
    out = compressed(model, wbits=4, sparsity=0.5)
    real = safetensors.torch.save_file
    calls = []

    def second_save_fails(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", second_save_fails)
    with pytest.raises(OSError, match="disk full"):
        export_compressed(model, out.grids, out.bits, str(tmp_path / "e"), True, len(OPTIONS))
    assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_weights_off_the_grid_are_refused(tmp_path):
    model = tiny_model(layers=1)
    out = compressed(model, wbits=4)
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[3, 5] += 1e-3
    with pytest.raises(ValueError, match="fc1: 1 of .* not on their quantization grid"):
        export_compressed(model, out.grids, out.bits, str(tmp_path / "e"), False, len(OPTIONS))
    assert os.listdir(tmp_path) == []


def test_not_an_export(tmp_path):
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / packed.PACKED)
    with pytest.raises(ValueError, match="not a"):
        load_compressed(str(tmp_path))


def test_the_cli_evaluates_a_packed_export_directory(tmp_path, tiny_dir):
    """`opt_enhanced.py DIR` runs the perplexity protocol on a packed export as on any model directory."""
    model_dir, data_dir = tiny_dir
    common = ["c4", "--data_dir", str(data_dir), "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--eval", "ptb", "--quiet"]
    first = run(oe.parse_args([str(model_dir), *common, "--sparsity", "0.5", "--wbits", "3",
                               "--target_avg_bits", "3.0", "--export", str(tmp_path / "packed")]))
    again = run(oe.parse_args([str(tmp_path / "packed"), *common]))
    assert again["perplexity"] == first["perplexity"]
