"""compressed-tensors export: transformers' own loader rebuilds the model that was evaluated, up to the format's
fp16 scales, and asking for the export does not change the compression."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import opt_enhanced as oe
from conftest import tiny_model
from formats.compressed_tensors_checkpoint import available, export_compressed_tensors
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig
from pipeline.evaluate import eval_windows, perplexity
from pipeline.run import run
from systems.progress import Log

# find_spec-style check, not an import: importing compressed-tensors takes ~5 s, paid only where a test runs
pytestmark = pytest.mark.skipif(not available(), reason="compressed-tensors is not installed")


def compressed_fp16_model(**flags):
    """A 1-layer fp16 OPT (64 columns: groups of 32 tile it) compressed in-process."""
    model = tiny_model(layers=1, hidden=64, ffn=128).half()
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=4, blocksize=32, **flags)
    validate(cfg)
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, compress(model, calib, cfg, torch.device("cpu"), Log(True))


def assert_within_scale_rounding(reloaded: torch.Tensor, evaluated: torch.Tensor, name: str) -> None:
    """The format stores fp16 scales: |s16 - s32| <= 2^-11 s (2^-24 absolute below fp16's normals), so a reloaded
    weight is within 2^-11 |w| of the evaluated one before its own rounding to fp16, another 2^-11 |w|."""
    r, e = reloaded.float(), evaluated.float()
    bound = 2.0 ** -10 * e.abs() + 2.0 ** -20
    assert bool(((r - e).abs() <= bound).all()), f"{name}: {float(((r - e).abs() - bound).max())} over the bound"
    assert bool(((r == 0) == (e == 0)).all()), f"{name}: zeros moved"


@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["dense", "50%"])
@pytest.mark.parametrize("groupsize", [-1, 32], ids=["row", "g32"])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("wbits", [2, 3, 4, 8])
def test_from_pretrained_reloads_the_evaluated_model_exactly(tmp_path, wbits, sym, groupsize, sparsity):
    model, done = compressed_fp16_model(wbits=wbits, sym=sym, groupsize=groupsize, sparsity=sparsity)
    export_compressed_tensors(model, done.grids, done.bits, str(tmp_path / "ct"))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"] and len(config["config_groups"]) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16).eval()
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reloaded(ids)  # the first forward decompresses
    for name in done.grids:
        assert_within_scale_rounding(reloaded.get_submodule(name).weight, model.get_submodule(name).weight, name)
    if sparsity:  # pruned weights travel as exact zeros
        fc1 = reloaded.model.decoder.layers[0].fc1.weight
        assert int((fc1 == 0).sum()) >= fc1.numel() // 2
    dev = torch.device("cpu")
    ppl = perplexity(model, eval_windows(ids.reshape(1, -1), 32), dev, 4)
    assert perplexity(reloaded, eval_windows(ids.reshape(1, -1), 32), dev, 4) == pytest.approx(ppl, rel=1e-3)


def test_per_linear_widths_become_one_config_group_per_width(tmp_path):
    model, done = compressed_fp16_model(sparsity=0.5, wbits=4, target_avg_bits=3.5, bit_method="budget",
                                        bit_scope="model", bit_granularity="linear", bit_options=[2, 3, 4, 8])
    report = export_compressed_tensors(model, done.grids, done.bits, str(tmp_path / "ct"))
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    widths = {name: int(b[0]) for name, b in done.bits.items()}
    assert len(groups) == len(set(widths.values())) > 1 and report.widths == {
        w: list(widths.values()).count(w) for w in sorted(set(widths.values()))}
    for group in groups.values():
        named = {t.removeprefix("re:^").removesuffix("$") for t in group["targets"]}
        assert {widths[n] for n in named} == {group["weights"]["num_bits"]}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16)
    with torch.no_grad():
        reloaded(torch.zeros(1, 4, dtype=torch.long))  # the first forward decompresses
    for name in done.grids:
        assert_within_scale_rounding(reloaded.get_submodule(name).weight, model.get_submodule(name).weight, name)


def test_size_on_disk_matches_the_prediction(tmp_path):
    model, done = compressed_fp16_model(wbits=3, sym=True, groupsize=32)
    report = export_compressed_tensors(model, done.grids, done.bits, str(tmp_path / "ct"))
    assert report.linear_bytes == report.predicted_linear_bytes
    assert report.weights_bytes < report.fp16_bytes


def test_per_channel_widths_are_refused_with_the_granularity_that_exports(tmp_path, tiny_dir, capsys):
    model_dir, data_dir = tiny_dir
    code = oe.main([str(model_dir), "c4", "--data_dir", str(data_dir), "--nsamples", "2", "--seqlen", "32",
                    "--wbits", "4", "--target_avg_bits", "3.5", "--export", str(tmp_path / "ct"),
                    "--export_format", "compressed-tensors", "--device", "cpu"])
    assert code == 2 and "--bit_granularity linear" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ct")


def test_cli_export_then_evaluate_the_directory(tmp_path, tiny_dir):
    model_dir, data_dir = tiny_dir
    common = ["c4", "--data_dir", str(data_dir), "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--eval", "ptb", "--quiet"]
    first = run(oe.parse_args([str(model_dir), *common, "--sparsity", "0.5", "--wbits", "4", "--sym",
                                "--export", str(tmp_path / "ct"), "--export_format", "compressed-tensors"]))
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "ct"))
    again = run(oe.parse_args([str(tmp_path / "ct"), *common]))  # our perplexity protocol on the saved directory
    assert again["perplexity"]["ptb"] == pytest.approx(first["perplexity"]["ptb"], rel=1e-3)


def test_the_export_flag_does_not_change_the_compression(tmp_path, tiny_dir):
    """The same flags with --save alone and with the compressed-tensors export alone: one compression, so the
    same perplexities, and reloaded (fp32) logits as close as the format's fp16 scales allow."""
    model_dir, data_dir = tiny_dir
    common = [str(model_dir), "c4", "--data_dir", str(data_dir), "--nsamples", "4", "--seqlen", "32", "--device",
              "cpu", "--eval", "ptb,wikitext2", "--quiet", "--sparsity", "0.5", "--wbits", "3", "--sym"]
    saved = run(oe.parse_args([*common, "--save", str(tmp_path / "save")]))
    exported = run(oe.parse_args([*common, "--export", str(tmp_path / "ct"), "--export_format",
                                     "compressed-tensors"]))
    assert exported["perplexity"] == saved["perplexity"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "save", dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gap = (a(ids).logits - b(ids).logits).abs().max().item()
    assert gap <= 5e-2
