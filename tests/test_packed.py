"""Tests of the packed export; CPU, seconds. Run: python -m pytest -q test_export.py"""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import opt_enhanced as oe
from conftest import tiny_model
from formats import packed
from formats.packed import (ExportReport, export_compressed, load_compressed, pack_bits, read_linear, unpack_bits,
                            write_run_record)
from pipeline.checks import validate
from pipeline.compress import Compressed, compress
from pipeline.config import RunConfig
from pipeline.run import run
from serving.layout import dequantized_weight
from serving.qlinear import QuantLinear
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


def assert_reloads(model, directory) -> None:
    """The file holds exactly the evaluated weights (read back and dequantized as the grid does), every other tensor
    as it was; the loaded model holds them as QuantLinear codes (no weight tensor) whose serving layout dequantizes
    within its scales' rounding: span x (shrink / maxq) in fp32 per row (a few fp32 ulps), the span in fp16 per
    group (2^-11 relatively), before the cast to the model's dtype."""
    loaded = load_compressed(str(directory))
    with safe_open(os.path.join(directory, packed.PACKED), "pt") as f:
        layouts = json.loads(f.metadata()["layers"])
        for name, layout in layouts.items():
            weight = model.get_submodule(name).weight
            read = read_linear(f, name, layout)
            assert read.weight().dtype == weight.dtype and torch.equal(read.weight(), weight), name
            module = loaded.get_submodule(name)
            assert isinstance(module, QuantLinear) and not any(t.is_floating_point() and t.shape == weight.shape
                                                               for t in module.buffers())
            tolerance = 2.0 ** -10 if layout["groupsize"] < layout["columns"] else 2.0 ** -20
            if weight.dtype == torch.float16:
                tolerance += 2.0 ** -10  # the cast to fp16 may round the other way
            got = dequantized_weight(module.layout()).to(weight.dtype).float()
            assert bool(((got - weight.float()).abs() <= tolerance * weight.float().abs()).all()), name
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in layouts}
    reloaded = loaded.state_dict()
    for k, v in dense.items():
        assert reloaded[k].dtype == v.dtype and torch.equal(reloaded[k], v), k
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.float(), loaded(ids).logits.float(), rtol=1e-2, atol=1e-3)


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
def test_export_holds_the_evaluated_weights_and_loads_as_codes(tmp_path, kw):
    model = tiny_model()
    out, report = export_run(model, tmp_path / "export", **kw)
    if "target_avg_bits" in kw or "clip" in kw:  # clipped ranges travel with the export
        assert any(g.shrink for g in out.grids.values())
    assert report.layers == len(out.grids) == (6 if "minlayer" in kw else 12)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp directory left beside it
    assert {"config.json", "packed.safetensors", "dense.safetensors", "compression.json"} <= set(
        os.listdir(tmp_path / "export"))
    assert_reloads(model, tmp_path / "export")


def test_fp16_model(tmp_path):
    model = tiny_model().half()
    export_run(model, tmp_path / "e", sparsity=0.5, wbits=4, target_avg_bits=3.5)
    loaded = load_compressed(str(tmp_path / "e"))
    assert loaded.dtype == torch.float16
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight  # tie survives
    assert_reloads(model, tmp_path / "e")


def test_packed_size_matches_storage_bits_and_beats_fp16(tmp_path):
    model = tiny_model(layers=1, hidden=256, ffn=1024, vocab=64)
    out, report = export_run(model, tmp_path / "e", sparsity=0.5, wbits=4, target_avg_bits=3.5, clip="none")
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
    assert_reloads(model, tmp_path / "empty")


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
    assert again["perplexity"]["ptb"] == pytest.approx(first["perplexity"]["ptb"], rel=1e-5)  # fp32 scale rounding


def test_a_packed_export_is_evaluated_not_compressed_again(tmp_path, tiny_dir, capsys):
    model_dir, data_dir = tiny_dir
    common = ["c4", "--data_dir", str(data_dir), "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--eval", "ptb", "--quiet"]
    assert oe.main([str(model_dir), *common, "--wbits", "4", "--export", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    for flags, message in ((["--wbits", "4"], "compressed already"), (["--save", str(tmp_path / "s")], "only copy it"),
                           (["--offload"], "drop --offload")):
        assert oe.main([str(tmp_path / "packed"), *common, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_generate_from_an_export_gives_the_evaluated_models_greedy_tokens(tmp_path, tiny_dir, capsys):
    """generate.py on the export (codes, dequantized per call on the CPU) against greedy decoding of the model the
    run evaluated (its --save), token for token."""
    import generate

    model_dir, data_dir = tiny_dir
    assert oe.main([str(model_dir), "c4", "--data_dir", str(data_dir), "--nsamples", "4", "--seqlen", "32",
                    "--device", "cpu", "--eval", "ptb", "--quiet", "--sparsity", "0.5", "--wbits", "3",
                    "--target_avg_bits", "3.0", "--export", str(tmp_path / "packed"), "--save",
                    str(tmp_path / "saved")]) == 0
    capsys.readouterr()
    assert generate.main([str(tmp_path / "packed"), "--prompt", "the cat", "--max_new_tokens", "12",
                          "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    net, tokenizer = generate.load_for_generation(str(tmp_path / "saved"), torch.device("cpu"))
    assert not any(isinstance(m, QuantLinear) for m in net.modules())  # the reference holds float weights
    assert got["tokens"] == generate.greedy(net, tokenizer, "the cat", 12, torch.device("cpu"))
    assert len(got["tokens"]) == 12 and got["text"] == tokenizer.decode(got["tokens"], skip_special_tokens=True)
    assert generate.main([str(tmp_path / "nowhere"), "--prompt", "x", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
