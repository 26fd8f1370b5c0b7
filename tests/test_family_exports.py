"""Every family's packed export reloads and evaluates to the run's perplexity.

A Llama-family export used to exit 0 and then fail to load: the rotary embedding's non-persistent buffers are in
no file, and the loader left them on the meta device ("Cannot copy out of meta tensor"). Each case compresses a
tiny random model of the family with `--export` and evaluates the export directory, both through the CLI in
this process. A second or so per family. Run: python -m pytest -q test_family_exports.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_families import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

import opt_enhanced as oe
from conftest import write_data
from formats import packed

CASES = {"llama": ("llama", False), "mistral": ("mistral", False), "qwen2-tied": ("qwen2", True),
         "qwen2-untied": ("qwen2", False)}


def family_model(kind: str, tied: bool, directory: Path, tokenizer: Path) -> Path:
    """A 2-layer random model of the family (grouped-query attention), saved with the tiny byte tokenizer."""
    torch.manual_seed(0)
    config = FAMILIES[kind](hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=260, max_position_embeddings=64,
                            tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The tiny data at a tenth of its size: a few dozen evaluation windows, so that each run takes a second."""
    root = tmp_path_factory.mktemp("family-data")
    write_data(root, words=400)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_packed_export_evaluates_to_the_runs_perplexity(case, tmp_path, tiny_dir, small_data, capsys):
    kind, tied = CASES[case]
    model = family_model(kind, tied, tmp_path / "model", tiny_dir[0])
    common = ["c4", "--data_dir", str(small_data), "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--eval", "ptb,wikitext2", "--quiet"]
    assert oe.main([str(model), *common, "--sparsity", "0.5", "--wbits", "4", "--export", str(tmp_path / "packed"),
                    "--results_json", str(tmp_path / "run.json")]) == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run.json").read_text())["perplexity"]
    assert oe.main([str(tmp_path / "packed"), *common, "--results_json", str(tmp_path / "again.json")]) == 0, \
        capsys.readouterr().err
    again = json.loads((tmp_path / "again.json").read_text())["perplexity"]
    assert again == pytest.approx(run, rel=1e-5)  # the serving layout's scales: a few fp32 ulps

    reloaded = packed.load_compressed(str(tmp_path / "packed"))
    assert packed.left_on_meta(reloaded) == []
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied


def test_a_tensor_left_without_values_is_refused(tmp_path, tiny_dir, monkeypatch):
    """Should a model ever hold a tensor that neither the files nor its own __init__ fill, loading says which,
    instead of the model failing at its first forward."""
    model = family_model("llama", False, tmp_path / "model", tiny_dir[0])
    net = AutoModelForCausalLM.from_pretrained(model)
    from quant import QuantGrid

    linear = "model.layers.0.mlp.down_proj"
    W = net.get_submodule(linear).weight
    grid = QuantGrid.rounding(W.detach().float(), False, -1)
    bits = torch.full((W.shape[1],), 8)
    with torch.no_grad():
        W.copy_(grid.round(W.detach().float(), bits))
    packed.export_compressed(net, {linear: grid}, {linear: bits}, str(tmp_path / "packed"), False, 1)
    real = packed.skeleton

    def without_rotary(config):
        built = real(config)
        built.model.rotary_emb.inv_freq = built.model.rotary_emb.inv_freq.to("meta")
        return built

    monkeypatch.setattr(packed, "skeleton", without_rotary)
    with pytest.raises(ValueError, match="no values for model.rotary_emb.inv_freq"):
        packed.load_compressed(str(tmp_path / "packed"))
