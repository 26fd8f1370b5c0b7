"""The end-to-end smoke test: the command line on a tiny OPT and tiny data (conftest.py), as a user runs it, with
its outputs read back. The parts have their own tests in tests/. CPU, seconds each. Run: python -m pytest -q"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM

import opt_enhanced as oe
from conftest import cli
from mixed import precision
from pipeline.config import RunConfig


def test_cli_dense_is_bit_identical(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--save", str(tmp_path / "saved"))
    assert code == 0 and res["summary"] is None
    a = OPTForCausalLM.from_pretrained(tiny_dir[0]).state_dict()
    b = OPTForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(res["perplexity"]) == {"wikitext2", "ptb", "c4"}


def test_cli_mixed_run_reports_statistics(tiny_dir, tmp_path, capsys):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.0",
                    "--bit_method", "budget")
    assert code == 0
    s = res["summary"]
    assert s["channels"] == 2 * (5 * 32 + 64)
    assert abs(s["stored_bits"] - 3.0) <= 0.02  # the target counts stored (kept) weights
    assert s["effective_bits"] > s["stored_bits"] / 2  # codes of half the weights, plus ranges, mask and bit map
    assert all(math.isfinite(v) for v in res["perplexity"].values())
    assert res["bit_scope"] == "model"  # the layers are on the device
    assert res["solve_order"] == "stored" and res["config"]["solve_order"] == "auto"
    assert res["config"]["error_shrinkage"] is None  # as asked; what ran is recorded beside it
    assert res["mixed_precision"]["error_shrinkage"] == precision.ERROR_SHRINKAGE["budget"]
    assert res["mixed_precision"]["method"] == "budget" and res["mixed_precision"]["target"] == 3.0
    assert res["config"]["clip_search"] == "auto" and res["mixed_precision"]["clip_search_kind"] == "once"  # CPU


@pytest.mark.parametrize("flags, said", [([], True), (["--clip_search", "full"], False)])
def test_a_mixed_run_on_the_cpu_says_it_searched_once(tiny_dir, tmp_path, capsys, flags, said):
    """The CPU's default clip search differs from the GPU's: the run says so under its statistics."""
    model, data = tiny_dir
    code = oe.main([str(model), "c4", "--data_dir", str(data), "--nsamples", "4", "--seqlen", "64", "--device", "cpu",
                    "--eval", "ptb", "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.0", *flags])
    out = capsys.readouterr().out
    assert code == 0 and "Quantization statistics" in out
    assert ("Clip search: each Linear's range factors searched once (the CPU's default" in out) == said


def test_cli_budget_at_4_bits_with_sparsity_stores_only_the_widths_next_to_the_target(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0",
                    "--bit_method", "budget")
    assert code == 0
    widths = {b for layer in res["layers"] for b in layer["bits_per_column"] or ()}
    assert widths <= {3, 4, 6} and len(widths) > 1
    assert abs(res["summary"]["stored_bits"] - 4.0) <= 0.02
    assert res["mixed_precision"]["options"] == [3, 4, 6] and res["config"]["bit_options"] is None
    assert res["bit_scope"] == "model" and res["config"]["bit_scope"] == "auto"  # auto resolved as the layers fit


def test_cli_budget_in_layer_scope_keeps_every_width(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "4.0",
                    "--bit_method", "budget", "--bit_scope", "layer")
    assert code == 0 and res["mixed_precision"]["options"] == [2, 3, 4, 6, 8] and res["bit_scope"] == "layer"


def test_save_reload_gives_same_perplexity(tiny_dir, tmp_path):
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.5",
                    "--save", str(tmp_path / "s"))
    assert code == 0
    (tmp_path / "again").mkdir()
    code2, res2 = cli((tmp_path / "s", tiny_dir[1]), tmp_path / "again")
    assert code2 == 0 and res2["perplexity"] == res["perplexity"]
    saved = json.loads((tmp_path / "s" / "compression.json").read_text())
    assert saved["summary"]["channels"] == res["summary"]["channels"]


def test_export_reloads_to_the_same_perplexity(tiny_dir, tmp_path):
    from formats.packed import load_compressed
    code, res = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.5",
                    "--bit_method", "budget", "--export", str(tmp_path / "packed"), "--save", str(tmp_path / "s"))
    assert code == 0 and res["export"]["layers"] == 12
    files = list((tmp_path / "packed").iterdir())  # the tokenizer is published with the rest, and counted
    assert (tmp_path / "packed" / "tokenizer_config.json") in files
    assert res["export"]["total_bytes"] == sum(f.stat().st_size for f in files)
    packed = load_compressed(str(tmp_path / "packed"))  # compressed Linears as codes, the rest as it was
    saved = OPTForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, saved(ids).logits, rtol=1e-4, atol=1e-5)


def test_same_command_twice_is_bit_identical(tiny_dir, tmp_path):
    flags = ["--sparsity", "0.5", "--wbits", "3", "--target_avg_bits", "3.0", "--bit_method", "budget"]
    _, a = cli(tiny_dir, tmp_path, *flags)
    _, b = cli(tiny_dir, tmp_path, *flags)
    assert a["perplexity"] == b["perplexity"] and a["layers"][3]["bits_per_column"] == b["layers"][3]["bits_per_column"]


def test_plot_writes_a_png(tiny_dir, tmp_path):
    pytest.importorskip("matplotlib")
    code, _ = cli(tiny_dir, tmp_path, "--wbits", "4", "--target_avg_bits", "3.5", "--plot", str(tmp_path / "b.png"))
    assert code == 0 and (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_script_runs_and_checks_targets(tiny_dir, tmp_path):
    import subprocess
    env = dict(os.environ, MODEL=str(tiny_dir[0]), DATA_DIR=str(tiny_dir[1]), OUT=str(tmp_path),
               EXTRA="--nsamples 4 --seqlen 64 --device cpu --eval ptb",
               ONLY="uniform-4bit,budget-4.0,budget-4.0-linear,quantile-3.5")  # one of each kind, of the nine
    done = subprocess.run(["bash", str(Path(__file__).parent / "run_comparison_test_fixed.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| budget-4.0 " in done.stdout and "stored averages within 0.02 of their targets" in done.stdout
    assert "nominal b | stored b | effective b" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(abs(r["summary"]["stored_bits"] - r["config"]["target_avg_bits"]) <= 0.02
               for r in results.values() if r["config"]["target_avg_bits"] is not None)
    assert len(results) == 4 and all(r["summary"]["channels"] == 2 * (5 * 32 + 64) for r in results.values())


def test_cli_defaults_are_run_config_defaults(monkeypatch):
    """One source of defaults: the flags given nothing produce RunConfig's own defaults."""
    monkeypatch.delenv("OPT_ENHANCED_CACHE", raising=False)
    assert oe.parse_args(["m", "c4"]) == RunConfig("m", "c4")
