"""Messages name the real cause: a tokenizer that needs a package that is not installed says which, a
Llama-family directory without tokenizer files says they are missing (as OPT's does), instead of "cannot load a
tokenizer (ValueError)". (An lm-eval YAML that does not parse: test_checks_before_work.py.)"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import LlamaConfig, MistralConfig

import tokenizer_loading
import opt_enhanced as oe

QUICK = ["--nsamples", "2", "--seqlen", "32", "--quiet", "--device", "cpu", "--eval", "ptb"]


def family_dir(path: Path, config) -> Path:
    """A Llama-family directory: config, weights, no tokenizer files."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def sentencepiece_only(path: Path) -> None:
    """A tokenizer as Llama 2 and Mistral ship it: tokenizer.model (SentencePiece) and no tokenizer.json."""
    (path / "tokenizer.model").write_bytes(b"\x0a\x0b<unk>\x15\x00\x00\x00\x00\x18\x02" * 10)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=260, max_position_embeddings=64)
    return family_dir(tmp_path_factory.mktemp("mistral") / "m", config)  # (its progress bar: before any capture)


@pytest.mark.parametrize("present,needle", [(set(), "needs sentencepiece, which is not installed: pip install "
                                                    "sentencepiece"),
                                             ({"sentencepiece"}, "needs tiktoken, which is not installed: pip install "
                                                                 "tiktoken")],
                         ids=["no-sentencepiece", "sentencepiece-but-no-tiktoken"])
def test_a_tokenizer_that_needs_a_missing_package_names_it(mistral, tmp_path, monkeypatch, capsys, tiny_dir, present,
                                                           needle):
    """transformers, without sentencepiece, falls back to reading tokenizer.model as tiktoken and reports tiktoken
    missing: the file is SentencePiece's, so sentencepiece is what to install; with sentencepiece there (and a file
    it cannot read), tiktoken is."""
    model = Path(shutil.copytree(mistral, tmp_path / "m"))
    sentencepiece_only(model)
    # neither package is installed here: what transformers raised, and the packages said present or not
    monkeypatch.setattr(tokenizer_loading, "installed", lambda package: package in present)
    code = oe.main([str(model), "c4", "--data_dir", str(tiny_dir[1]), *QUICK, "--sparsity", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the tokenizer of {model} is tokenizer.model without tokenizer.json" in err and needle in err, err


def test_missing_tokenizer_files_on_a_llama_directory(tmp_path, capsys, tiny_dir):
    """transformers asks for sentencepiece or tiktoken when a Llama directory has no tokenizer file at all."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=260, max_position_embeddings=64)
    model = family_dir(tmp_path / "llama", config)
    capsys.readouterr()  # save_pretrained's progress bar, in this process
    code = oe.main([str(model), "c4", "--data_dir", str(tiny_dir[1]), *QUICK, "--sparsity", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"are missing from {model}; copy them from the model it was trained with" in err, err
    assert "sentencepiece" not in err
    assert os.listdir(model) and not any(f.startswith("tokenizer") for f in os.listdir(model))
