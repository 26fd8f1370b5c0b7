"""The command line's errors: hostile inputs, each ends with its exit code (2 usage, 1 run failure, 130/143
interrupted), one line on stderr that names the fix or the file, no traceback, and nothing left behind
under the output paths. Tiny models and data (conftest.py); most cases stop before any work."""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTForCausalLM

import datautils
import modelutils
import opt_enhanced as oe
import pipeline.checks
import pipeline.cli
import pipeline.placement
import pipeline.run
from conftest import ROOT, cli, tiny_model, write_data, write_tokenizer
from pipeline.checks import check_model, validate
from pipeline.config import CHOICES, UsageError
from pipeline.placement import device_starting
from systems.atomic_io import nonfinite_path, write_json

QUICK = ["--nsamples", "2", "--seqlen", "32", "--quiet", "--device", "cpu", "--eval", "ptb"]


def run_cli(model: Path, data: Path | None, tmp_path: Path, *flags: str, dataset: str = "c4") -> tuple[int, Path]:
    """main() with the usual outputs (--results_json, --save) in a fresh folder `out`; (exit code, out)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    data_flags = [] if data is None else ["--data_dir", str(data)]
    code = oe.main([str(model), dataset, *data_flags, *QUICK, "--results_json", str(out / "r.json"),
                    "--save", str(out / "s"), *flags])
    return code, out


def assert_one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- usage errors before any work


USAGE = [
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_method", "budget", "--importance_weights", "nan,1,1,1,1"],
     "--importance_weights"),
    (["--wbits", "4", "--target_avg_bits", "4", "--importance_weights", "inf,1,1,1,1"], "--importance_weights"),
    (["--wbits", "4", "--target_avg_bits", "4", "--importance_weights=-1,1,1,1,1"], "non-negative"),
    (["--seqlen", "1"], "--seqlen 2 or more"),
    (["--eval", ""], "--eval is empty"),
    (["--eval", "c4,lambada"], "'lambada'"),
    (["--wbits", "4", "--groupsize", "-7"], "--groupsize -7"),
    (["--wbits", "4", "--groupsize", "0"], "or -1 for one grid per row"),
    (["--sparsity", "0.5", "--percdamp", "-0.1"], "--percdamp -0.1 is negative"),
    (["--sparsity", "0.5", "--percdamp", "nan"], "--percdamp nan is not a finite number; see --help"),
    (["--bit_options", "4", "--wbits", "4", "--target_avg_bits", "4", "--bit_method", "budget"],
     "uniform quantization"),
    (["--prunen", "2", "--prunem", "256"], "--prunem 256 does not divide --blocksize 128"),
    (["--prunen", "2", "--prunem", "5"], "--prunem 5 does not divide --blocksize 128"),
    (["--prunen", "4", "--prunem", "5"], "--prunem 5 does not divide"),
    (["--prunen", "2", "--prunem", "4", "--blocksize", "6"], "an M that divides 6 (e.g. 3)"),  # not 4
    (["--nsamples", "0"], "--nsamples 0: give a positive number"),
    (["--batch_size", "-2"], "--batch_size -2: give a positive number"),
    (["--seqlen", "-3"], "--seqlen -3: a window needs at least 2 tokens"),
    (["--wbits", "4", "--target_avg_bits", "3", "--bit_options", "2,4,4"], "--bit_options 2,4,4: give distinct"),
    (["--wbits", "4", "--target_avg_bits", "3", "--importance_weights", "1,1,1"], "(got 1.0,1.0,1.0)"),
    (["--data_dir", "/nonexistent-h16"], "ptb/ and c4/"),
    (["--sparsity", "0.5", "--minlayer", "5", "--maxlayer", "2"], "selects no Linear layer"),
    (["--sparsity", "0.5", "--prune_only", "nothing_like_this"], "selects no Linear layer"),
    (["--wbits", "4", "--invert"], "selects no Linear layer"),
    (["--wbits", "4", "--maxlayer", "0"], "widen the selection"),
    (["--device", "nonsense"], "is not a device"),
    (["--wbits", "4", "--target_avg_bits", "4", "--error_shrinkage", "1.5"], "--error_shrinkage 1.5 is outside [0, 1]"),
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--prunen", "2"], "give both --prunen and --prunem"),
    (["--prunen", "4", "--prunem", "4"], "must be below --prunem"),
    (["--wbits", "5"], "not among --bit_options"),
    (["--target_avg_bits", "4.0"], "add --wbits 4"),
    (["--wbits", "4", "--target_avg_bits", "9"], "outside [2, 8]"),
    (["--wbits", "4", "--target_avg_bits", "1.5"], "outside [2, 8]"),
    (["--wbits", "4", "--bit_options", "4,4,8"], "distinct widths"),
    (["--wbits", "4", "--importance_weights", "1,1"], "five non-negative numbers"),
    (["--wbits", "4", "--importance_weights", "0,0,0,0,0"], "five non-negative numbers"),
    (["--gmp", "--sparsity", "0.5", "--wbits", "4"], "add --nearest"),
    (["--nearest", "--sparsity", "0.5", "--wbits", "4"], "add --gmp"),
    (["--eval", "wikitext2,lambada"], "unknown dataset"),
    (["--seqlen", "4096"], "exceeds the model's 128 positions"),
    (["--wbits", "4", "--act-order", "--groupsize", "16"], "--act-order works with"),
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_scope", "model", "--offload"], "drop --offload"),
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_granularity", "linear", "--offload"], "drop --offload"),
    (["--wbits", "4", "--target_avg_bits", "4", "--bit_granularity", "linear", "--bit_scope", "layer"],
     "drop --bit_scope layer"),
    (["--wbits", "4", "--clip_search", "fast"], "searches none"),
]
if not torch.cuda.is_available():
    USAGE.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("flags,message", USAGE, ids=[" ".join(f) for f, _ in USAGE])
def test_flags_that_would_do_nothing_or_nonsense_are_usage_errors(tiny_dir, tmp_path, capsys, flags, message):
    code, out = run_cli(*tiny_dir, tmp_path, *flags)
    assert code == 2
    assert_one_line_error(capsys, message)
    assert os.listdir(out) == []


@pytest.mark.parametrize("setting, message", [
    (dict(sensitivity_shrinkage=-0.5), "sensitivity_shrinkage -0.5 is outside [0, 1]"),
    (dict(clip_sample_rows=0), "clip_sample_rows 0: the clip search solves at least one row"),
    (dict(sensitivity_windows=129), "sensitivity_windows 129: between 1 and --nsamples (128), or 0 for all"),
    (dict(sensitivity_windows=-1), "sensitivity_windows -1: between 1 and --nsamples (128), or 0 for all"),
    (dict(solve_order="narrow_first", target_avg_bits=None), "solve_order narrow_first orders the columns of a mixed run"),
])
def test_settings_without_a_flag_are_checked_like_flags(setting, message):
    """The variants that lost have no flag; experiments set them on the RunConfig, and validate() holds them."""
    cfg = dataclasses.replace(oe.parse_args(["m", "c4", "--wbits", "4", "--target_avg_bits", "4"]), **setting)
    with pytest.raises(UsageError, match=re.escape(message)):
        validate(cfg)


def test_the_flags_of_lost_variants_are_gone(capsys):
    for flag in ("--sensitivity_shrinkage=0.5", "--channel_cost=error", "--shrinkage_mean=per_weight",
                 "--solve_order=narrow_first"):
        with pytest.raises(SystemExit):
            oe.parse_args(["m", "c4", flag])
    assert capsys.readouterr().err.count("error: ") == 4


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_config_built_in_code_is_held_to_the_flags_choices(name):
    cfg = dataclasses.replace(oe.parse_args(["m", "c4", "--wbits", "4", "--target_avg_bits", "4"]), **{name: "nonsense"})
    with pytest.raises(UsageError, match=f"--{name} 'nonsense'"):
        validate(cfg)


def test_malformed_command_line_is_one_line(capsys):
    for argv in (["m", "c4", "--nsamples", "abc"], ["m"], ["m", "lambada"]):
        with pytest.raises(SystemExit) as e:
            oe.main(argv)
        assert e.value.code == 2
        assert_one_line_error(capsys, "(see --help)")


def test_calibration_larger_than_memory_is_a_usage_error(tiny_dir, tmp_path, capsys, monkeypatch):
    """--nsamples 100000000 took minutes, then the kernel killed the run; now the layer inputs it would need are
    compared with the device's memory first (here a pretend 256 KiB less a byte: 64 x 32 tokens x 32 wide x 4 B = 256 KiB)."""
    monkeypatch.setattr(pipeline.checks, "device_memory", lambda dev: 2 ** 18 - 1)
    code, out = run_cli(*tiny_dir, tmp_path, "--nsamples", "64")
    assert code == 2
    assert_one_line_error(capsys, "--nsamples 64 windows of 32 tokens", "lower --nsamples")
    assert os.listdir(out) == []


def test_spaces_in_the_eval_list_are_ignored():
    assert oe.parse_args(["m", "c4", "--eval", "c4, ptb"]).eval == ["c4", "ptb"]


def test_empty_model_argument(tmp_path, capsys):
    assert oe.main(["", "c4", "--results_json", str(tmp_path / "r.json")]) == 2
    assert_one_line_error(capsys, "model argument is empty")
    assert os.listdir(tmp_path) == []


def output_cases(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    return [
        (["--save", str(tmp / "afile" / "s")], "is not a directory"),
        (["--wbits", "4", "--export", str(tmp / "afile" / "e")], "is not a directory"),
        (["--results_json", str(tmp / "afile" / "r.json")], "is not a directory"),
        (["--wbits", "4", "--target_avg_bits", "3.5", "--plot", str(tmp / "afile" / "p.png")], "is not a directory"),
        (["--results_json", str(tmp / "adir")], "is a directory; give a file path"),
        (["--save", str(tmp / "afile")], "is a file; --save writes a directory"),
        (["--save", str(tmp / "missing" / "s")], "does not exist"),
        (["--wbits", "4", "--target_avg_bits", "3.5", "--plot", str(tmp / "same")],
         "need different paths"),
        (["--wbits", "4", "--target_avg_bits", "3.5", "--plot", str(tmp / "adir")], "e.g. " + str(tmp / "adir" / "bits.png")),
        (["--wbits", "4", "--export", str(tmp.parent / "out" / "s")], "--save and --export both name"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_output_paths_are_checked_before_any_work(tiny_dir, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(pipeline.cli, "check_model", lambda cfg: pytest.fail("checked the model before the outputs"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flags, message = output_cases(elsewhere)[case]
    if case == 7:  # --results_json and --plot on one path
        flags = [*flags, "--results_json", str(elsewhere / "same")]
    code, out = run_cli(*tiny_dir, tmp_path, *flags)
    assert code == 2
    assert_one_line_error(capsys, message)
    assert os.listdir(out) == [] and sorted(os.listdir(elsewhere)) == ["adir", "afile"]


def test_cache_dir_that_is_a_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "cache").write_text("x")
    code, out = run_cli(*tiny_dir, tmp_path, "--cache_dir", str(tmp_path / "cache"))
    assert code == 2
    assert_one_line_error(capsys, "--cache_dir")
    assert os.listdir(out) == []


# ---------------------------------------------------------------- models that are not what they claim


def test_model_of_another_family_is_refused(tmp_path, capsys, tiny_dir):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=260)).save_pretrained(tmp_path / "gpt2")
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                vocab_size=260).save_pretrained(tmp_path / "llama")
    capsys.readouterr()  # save_pretrained's progress bar
    write_tokenizer(tmp_path / "gpt2")
    code, out = run_cli(tmp_path / "gpt2", tiny_dir[1], tmp_path, "--sparsity", "0.5")
    assert code == 2
    assert_one_line_error(capsys, "is a 'gpt2' model", "opt", "llama")
    assert os.listdir(out) == []
    # a supported family (LLaMA) whose directory holds a config but no weights: refused, not run at random
    write_tokenizer(tmp_path / "llama")
    code, out = run_cli(tmp_path / "llama", tiny_dir[1], tmp_path, "--sparsity", "0.5")
    assert code == 2
    assert_one_line_error(capsys, "cannot load the weights")
    assert os.listdir(out) == []


def test_model_argument_that_is_a_file(tiny_dir, tmp_path, capsys):
    code, out = run_cli(tiny_dir[0] / "config.json", tiny_dir[1], tmp_path)
    assert code == 2
    assert_one_line_error(capsys, "config.json is a file, not a model directory")
    assert os.listdir(out) == []


def transformers_warnings(call: Callable[[], Any]) -> list[str]:
    """The warnings transformers logs while `call()` runs (its logger writes to the stderr it found at import,
    which capsys misses). Its warn-once memory is cleared first, so a warning an earlier test drew shows again."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        call()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_checking_a_model_draws_no_transformers_warnings(tiny_dir, tmp_path):
    """A config of another family (its special tokens outside its vocabulary) is refused in one line, without
    transformers' warnings ahead of it; a config without a dtype is checked without the `torch_dtype` one."""
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32,
                                                               "n_head": 4, "vocab_size": 260, "bos_token_id": 50256,
                                                               "eos_token_id": 50256}))

    def refused():
        with pytest.raises(modelutils.ModelError, match="is a 'gpt2' model"):
            modelutils.load_config(str(tmp_path / "gpt2"))
    assert transformers_warnings(refused) == []
    model = copy_model(tiny_dir[0], tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (model / "config.json").write_text(json.dumps(config))
    cfg = oe.parse_args([str(model), "c4", "--data_dir", str(tiny_dir[1]), *QUICK, "--sparsity", "0.5"])
    assert transformers_warnings(lambda: check_model(cfg)) == []


def damaged_model(tiny_dir, tmp_path: Path, how: str) -> Path:
    model = copy_model(tiny_dir[0], tmp_path / "m")
    weights = model / "model.safetensors"
    if how == "missing tensor":
        tensors = load_file(weights)
        del tensors["model.decoder.layers.1.fc2.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "vocab_size not the weights'":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    elif how == "no weights":
        weights.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "corrupt header":
        blob = bytearray(weights.read_bytes())
        blob[8:40] = b"#" * 32
        weights.write_bytes(bytes(blob))
    elif how == "truncated config":
        config = model / "config.json"
        config.write_text(config.read_text()[:40])
    elif how == "config not JSON":
        (model / "config.json").write_text("model_type: opt\n")
    elif how == "no config":
        (model / "config.json").unlink()
    return model


DAMAGE = [("missing tensor", "layers.1.fc2.weight"), ("vocab_size not the weights'", "1 mis-shaped"),
          ("no weights", "cannot load the weights"),
          ("truncated weights", "cannot load the weights"), ("corrupt header", "cannot load the weights"),
          ("truncated config", "config.json"), ("config not JSON", "config.json"), ("no config", "no config.json")]


@pytest.mark.parametrize("how,message", DAMAGE, ids=[h for h, _ in DAMAGE])
def test_damaged_checkpoint_is_refused_naming_it(tiny_dir, tmp_path, capsys, how, message):
    model = damaged_model(tiny_dir, tmp_path, how)
    code, out = run_cli(model, tiny_dir[1], tmp_path, "--sparsity", "0.5")
    assert code == 2
    assert_one_line_error(capsys, message, str(model))
    assert os.listdir(out) == []


def test_hessian_warnings_and_errors_name_the_linear(tiny_dir, tmp_path, capsys):
    """--percdamp 0 on 4 calibration tokens: every Hessian is singular, retried with more damping; each warning
    says whose it is. A Hessian that stays singular names its Linear too."""
    from sparsegpt_enhanced import SparseGPT

    code, _ = run_cli(*tiny_dir, tmp_path, "--sparsity", "0.5", "--percdamp", "0", "--nsamples", "1", "--seqlen", "4")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "Hessian" in line]
    assert code == 0 and warnings
    assert all("Hessian of the input to model.decoder.layers." in line for line in warnings), warnings
    assert any(".0.self_attn.q_proj not positive definite" in line for line in warnings), warnings
    solver = SparseGPT(4, name="model.decoder.layers.3.fc1")
    solver.add_batch(torch.full((2, 4), float("nan")))
    with pytest.raises(RuntimeError, match="input to model.decoder.layers.3.fc1 stays singular"):
        solver.inverse_factor(0.01, log=lambda msg: None)


def test_nan_weight_outside_the_compressed_layers_fails_naming_the_tensor(tiny_dir, tmp_path, capsys):
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(tiny_dir[0])
    with torch.no_grad():
        model.model.decoder.layers[1].final_layer_norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    write_tokenizer(tmp_path / "m")
    for flags in ([], ["--sparsity", "0.5", "--maxlayer", "1"], ["--sparsity", "0.5", "--gmp"]):
        code, out = run_cli(tmp_path / "m", tiny_dir[1], tmp_path, *flags)
        assert code == 1
        assert_one_line_error(capsys, "model.decoder.layers.1.final_layer_norm.weight")
        assert os.listdir(out) == []


@pytest.mark.parametrize("vocab", [64, 1024], ids=["larger than the embedding", "under half the embedding"])
def test_tokenizer_of_another_model(tiny_dir, tmp_path, capsys, vocab):
    """260 tokens into an embedding of 64 (an IndexError once), or of 1024 (ran, to a perplexity of nonsense)."""
    tiny_model(vocab=vocab, positions=128).save_pretrained(tmp_path / "m")
    write_tokenizer(tmp_path / "m")
    code, out = run_cli(tmp_path / "m", tiny_dir[1], tmp_path)
    assert code == 2
    assert_one_line_error(capsys, "260 tokens", f"embedding has {vocab}", "another model")
    assert os.listdir(out) == []


def test_missing_tokenizer_files(tiny_dir, tmp_path, capsys):
    model = copy_model(tiny_dir[0], tmp_path / "m")
    for name in ("vocab.json", "merges.txt"):
        (model / name).unlink()
    code, out = run_cli(model, tiny_dir[1], tmp_path)
    assert code == 2
    assert_one_line_error(capsys, "tokenizer", str(model))
    assert os.listdir(out) == []


# ---------------------------------------------------------------- the hub out of reach


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE=1", "no network"])
def test_hub_model_out_of_reach_fails_fast_naming_a_local_directory(tmp_path, capsys, monkeypatch, offline):
    """With HF_HUB_OFFLINE set, the message says so (the hub was not tried); without it, on a machine that
    cannot reach the hub, it says that and names --data_dir too, in seconds rather than after retries."""
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(modelutils, "_HUB_HOST", ("127.0.0.1", 9))  # connection refused at once
    tick = time.time()
    code = oe.main(["facebook/opt-125m-not-in-any-cache", "c4", "--results_json", str(tmp_path / "r.json")])
    assert code == 2 and time.time() - tick < 10
    needles = ("HF_HUB_OFFLINE is set", "local model directory") if offline else \
        ("cannot reach the Hugging Face hub", "local model directory", "--data_dir")
    assert_one_line_error(capsys, *needles)
    assert os.listdir(tmp_path) == []


def test_hub_data_unreachable_names_data_dir(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(modelutils, "_HUB_HOST", ("127.0.0.1", 9))  # connection refused at once
    code, out = run_cli(tiny_dir[0], None, tmp_path)
    assert code == 2
    assert_one_line_error(capsys, "--data_dir")
    assert os.listdir(out) == []


# ---------------------------------------------------------------- data files


def damaged_data(tmp_path: Path, how: str) -> tuple[Path, str, str]:
    """(data dir, calibration dataset, file the message must name)."""
    data = tmp_path / "data"
    write_data(data, words=400)
    c4 = data / "c4" / "c4-validation.00000-of-00008.json.gz"
    if how == "two C4 validation files":
        shutil.copy(c4, data / "c4" / "c4-validation.00000-of-00008.first10.json.gz")
        return data, "c4", "c4-validation.00000-of-00008.first10.json.gz"
    if how == "truncated gzip":
        c4.write_bytes(c4.read_bytes()[:200])
    elif how == "not gzip":
        c4.write_bytes(b"this is not gzip data at all")
    elif how == "no text field":
        with gzip.open(c4, "wt") as f:
            f.write(json.dumps({"content": "a b c"}) + "\n")
    elif how == "not JSON":
        with gzip.open(c4, "wt") as f:
            f.write("the cat sat\n")
    elif how == "PTB not UTF-8":
        ptb = data / "ptb" / "ptb.train.txt"
        ptb.write_bytes(ptb.read_bytes() + b"\xff\xfe bad\n")
        return data, "ptb", str(ptb)
    elif how == "WikiText not UTF-8":
        wiki = data / "wikitext-2-raw" / "wiki.train.raw"
        wiki.write_bytes(b"\xc3\x28 broken\n" + wiki.read_bytes())
        return data, "wikitext2", str(wiki)
    return data, "ptb", str(c4)


DATA_DAMAGE = ["two C4 validation files", "truncated gzip", "not gzip", "no text field", "not JSON", "PTB not UTF-8",
               "WikiText not UTF-8"]


@pytest.mark.parametrize("how", DATA_DAMAGE)
def test_damaged_data_file_is_named(tiny_dir, tmp_path, capsys, how):
    data, dataset, named = damaged_data(tmp_path, how)
    code = oe.main([str(tiny_dir[0]), dataset, "--data_dir", str(data), *QUICK[:-2], "--eval", "c4",
                    "--results_json", str(tmp_path / "r.json")])
    assert code == 2
    assert_one_line_error(capsys, named)
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- the token cache


def cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.suffix == ".pt")


def test_damaged_cache_entries_are_detected_and_rebuilt(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data, words=400)
    cache = tmp_path / "cache"
    flags = ["--cache_dir", str(cache)]
    datautils._MEMO.clear()
    code, out = run_cli(tiny_dir[0], data, tmp_path, *flags)
    assert code == 0
    clean = json.loads((out / "r.json").read_text())["perplexity"]
    entries = cache_entries(cache)
    assert len(entries) == 2  # C4 calibration documents, PTB evaluation text
    target = [p for p in entries if p.name.startswith("ptb-eval")][0]
    blob = torch.load(target, weights_only=True)
    # a flipped byte in the ids; ids outside the vocabulary (with a matching checksum); a directory in the way
    for damage in ("flip", "vocab", "directory"):
        shutil.rmtree(out)
        datautils._MEMO.clear()
        if damage == "flip":
            raw = bytearray(target.read_bytes())
            raw[raw.index(blob["ids"][5:9].numpy().tobytes())] ^= 0x01
            target.write_bytes(bytes(raw))
        elif damage == "vocab":
            ids = blob["ids"].clone()
            ids[3] = 10 ** 6
            torch.save({"ids": ids, "lengths": blob["lengths"],
                        "sha256": datautils._checksum(ids, blob["lengths"])}, target)
        else:
            target.unlink()
            target.mkdir()
        code, out = run_cli(tiny_dir[0], data, tmp_path, *flags)
        err = capsys.readouterr().err
        assert code == 0, err
        assert json.loads((out / "r.json").read_text())["perplexity"] == clean
        if damage != "directory":
            assert "warning: cache entry" in err and target.name in err
            assert torch.equal(torch.load(target, weights_only=True)["ids"], blob["ids"])  # rebuilt
        else:
            assert "cannot write the cache entry" in err
        assert "Traceback" not in err
        assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- results that cannot be right


def test_nan_perplexity_fails_and_writes_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline.run, "perplexity", lambda *a, **k: float("nan"))
    code, out = run_cli(*tiny_dir, tmp_path, "--sparsity", "0.5")
    assert code == 1
    assert_one_line_error(capsys, "ptb perplexity is nan")
    assert os.listdir(out) == []


def test_allocation_off_target_fails(tiny_dir, tmp_path, capsys, monkeypatch):
    from mixed import bitalloc

    monkeypatch.setattr(bitalloc, "allocate", lambda costs, mp, target=None: torch.full((costs.size.numel(),), 2))
    code, out = run_cli(*tiny_dir, tmp_path, "--wbits", "4", "--target_avg_bits", "4", "--bit_method", "budget")
    assert code == 1
    assert_one_line_error(capsys, "stores 2.000 bits", "--target_avg_bits 4.0")
    assert os.listdir(out) == []


def test_results_json_never_holds_nan(tmp_path):
    assert nonfinite_path({"a": [1.0, {"b": float("inf")}]}) == "a[1].b"
    with pytest.raises(RuntimeError, match=r"a\[1\]\.b"):
        write_json({"a": [1.0, {"b": float("nan")}]}, str(tmp_path / "r.json"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- unexpected errors and signals


def test_unexpected_error_is_one_line_naming_the_stage(tiny_dir, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(pipeline.run, "compress", broken)
    code, out = run_cli(*tiny_dir, tmp_path, "--sparsity", "0.5")
    assert code == 1
    assert_one_line_error(capsys, "unexpected ZeroDivisionError while compress", "--debug")
    assert os.listdir(out) == []
    code, out = run_cli(*tiny_dir, tmp_path, "--sparsity", "0.5", "--debug")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err.splitlines()[-1]


def test_failure_after_an_output_was_written_removes_it(tiny_dir, tmp_path, capsys, monkeypatch):
    """--save is written, then the export fails (a full disk): the checkpoint goes too, and --save's
    directory, empty before the run, is left empty."""
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pipeline.run, "export_compressed", full)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s").mkdir()
    code, out = run_cli(*tiny_dir, tmp_path, "--wbits", "4", "--export", str(tmp_path / "out" / "e"))
    assert code == 1
    assert_one_line_error(capsys, f"unexpected OSError while writing --export {tmp_path / 'out' / 'e'}",
                          "No space left on device")
    assert os.listdir(out) == ["s"] and os.listdir(out / "s") == []


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_while_writing_cleans_up(tiny_dir, tmp_path, capsys, monkeypatch, signum, code, word):
    """The signal arrives while the checkpoint is being written (a scheduler's time limit)."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def interrupted(self, directory, *a, **kw):
        real(self, directory, *a, **kw)
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises in the main thread before this ends
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    got, out = run_cli(*tiny_dir, tmp_path)
    assert got == code and signal.getsignal(signal.SIGTERM) == previous
    assert_one_line_error(capsys, word, "while writing --save", "temporary outputs removed")
    assert os.listdir(out) == []


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_second_signal_during_the_cleanup_is_ignored(tiny_dir, tmp_path, capsys, monkeypatch, signum, code):
    """Ctrl-C pressed twice: the second arrives while the half-written checkpoint is being removed, and
    must not stop that removal (nor print a traceback)."""
    from transformers import PreTrainedModel

    from systems import atomic_io

    real_save, real_rmtree = PreTrainedModel.save_pretrained, shutil.rmtree

    def interrupted(self, directory, *a, **kw):
        real_save(self, directory, *a, **kw)
        os.kill(os.getpid(), signum)
        time.sleep(5)

    def impatient(path, *a, **kw):
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # delivered here, if it is not ignored
        real_rmtree(path, *a, **kw)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    monkeypatch.setattr(atomic_io.shutil, "rmtree", impatient)  # the atomic writer's cleanup
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    got, out = run_cli(*tiny_dir, tmp_path)
    assert got == code and {s: signal.getsignal(s) for s in before} == before
    assert_one_line_error(capsys, "while writing --save", "temporary outputs removed")
    assert os.listdir(out) == []


@pytest.mark.slow  # a subprocess: importing torch again
def test_signal_during_the_interpreters_exit_is_ignored(tmp_path):
    """The interpreter's exit used to run torch's atexit hooks for a second or so, and a SIGINT then (the second
    Ctrl-C of two) printed their traceback under our message; the process now ends without them. Here an atexit
    hook registered first (so run last, if any ran) sends one."""
    script = ("import atexit, os, runpy, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n"
              "sys.path.insert(0, os.getcwd())\n"
              "sys.argv = ['opt_enhanced.py', *sys.argv[1:]]\n"
              "runpy.run_path('opt_enhanced.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script, "m", "c4", "--seqlen", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --seqlen 1"), done.stderr


# ---------------------------------------------------------------- small things a first-time user meets


def test_success_says_where_outputs_went_and_files_follow_the_umask(tiny_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        datautils._MEMO.clear()
        code, out = run_cli(*tiny_dir, tmp_path, "--cache_dir", str(tmp_path / "cache"))
    finally:
        os.umask(old)
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["outputs"] == {"save": str(out / "s"), "results_json": str(out / "r.json")}
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out / "r.json", *cache_entries(tmp_path / "cache")]}
    modes.update({p: stat.S_IMODE(p.stat().st_mode) for p in (out / "s").iterdir()})  # the weights too
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE((out / "s").stat().st_mode) == 0o755


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        oe.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in text and "(default: 0.01)" in text and "(default: 1.0,1.0,1.0,1.0,1.0)" in text
    assert "(default: 2,3,4,6,8; budget" in text  # a default that depends on the run says how


def test_requirements_list_every_third_party_import():
    names = {line.split("==")[0].split(">=")[0].split(";")[0].strip().lower()
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert "tqdm" in names


def test_the_gpu_warm_up_runs_beside_the_block_and_is_waited_for(monkeypatch):
    """device_starting: the warm-up runs on its own thread while the block runs, the block's end waits for it,
    and its error is raised there; the block's own error wins. CPU runs start nothing."""
    import threading
    import time

    cfg = oe.parse_args(["m", "c4", "--sparsity", "0.5", "--wbits", "4", "--device", "cpu"])
    seen = []

    def warm_up(cfg, dev, fail=False):
        seen.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.3)
        seen.append("done")
        if fail:
            raise RuntimeError("CUDA error in the warm-up")

    monkeypatch.setattr(pipeline.placement, "warm_up_device", warm_up)
    with device_starting(cfg):  # on the CPU: nothing to start
        pass
    assert seen == []
    monkeypatch.setattr(pipeline.placement, "run_device", lambda cfg: torch.device("cuda"))
    with device_starting(cfg):
        assert seen in ([], [False])  # started, not finished
    assert seen == [False, "done"]
    monkeypatch.setattr(pipeline.placement, "warm_up_device", lambda cfg, dev: warm_up(cfg, dev, fail=True))
    with pytest.raises(RuntimeError, match="in the warm-up"):
        with device_starting(cfg):
            pass
    with pytest.raises(KeyError):
        with device_starting(cfg):
            raise KeyError("the block's own")
    nearest = oe.parse_args(["m", "c4", "--wbits", "4", "--nearest"])
    seen.clear()
    with device_starting(nearest):  # nothing calibrated to compress: nothing to start
        pass
    assert seen == []


@pytest.mark.slow  # a subprocess: importing torch again
def test_the_command_in_a_fresh_process_without_root_powers(tiny_dir, tmp_path):
    """The checks that need a process of their own, in one (tests/fresh_process.py; each child imports torch and
    transformers: seconds), which file permissions bind: root there lacks the capabilities that let it read and
    write anything (setpriv); anyone else runs as is.
    - transformers takes seconds to import; the CLI imports it while the GPU starts (device_starting), which only
      overlaps if importing the CLI does not import it. run() then loads the model on a thread while the main thread
      tokenizes; both use transformers, and two threads importing it at once failed ("cannot import name
      'AutoConfig' from 'transformers'"), so run() imports it before that thread starts, also when called without
      main() (bench.py), and without scikit-learn (modelutils.import_hiding), which stays importable.
    - Read-only output and cache directories, an unreadable weights file and data file: one-line errors, nothing
      written (the run as root would just write and read).
    - The process ends at once after main() (no interpreter teardown): whatever it printed into a pipe and wrote
      must be there, the final JSON line and the results file both, with startup counted from the process's start.
    """
    locked = tmp_path / "locked"
    locked.mkdir()
    model = copy_model(tiny_dir[0], tmp_path / "m")
    data = tmp_path / "data"
    shutil.copytree(tiny_dir[1], data)
    (model / "model.safetensors").chmod(0)
    (data / "ptb" / "ptb.test.txt").chmod(0)
    locked.chmod(0o555)
    run = [str(tiny_dir[0]), "c4", "--data_dir", str(tiny_dir[1]), *QUICK]
    cases = [
        ([*run, "--results_json", str(locked / "r.json")], 2, "cannot write into"),
        ([*run, "--save", str(locked / "s")], 2, "cannot write into"),
        ([str(model), *run[1:]], 2, f"cannot read {model / 'model.safetensors'} (permission denied)"),
        ([str(tiny_dir[0]), "c4", *QUICK, "--data_dir", str(data)], 2,
         f"cannot read {data / 'ptb' / 'ptb.test.txt'} (permission denied)"),
        ([*run, "--cache_dir", str(locked / "cache")], 0, "warning: cannot write the cache entry"),
    ]
    cmd = [sys.executable, str(ROOT / "tests" / "fresh_process.py"), json.dumps([argv for argv, _, _ in cases]),
           json.dumps([*run, "--seed", "1", "--eval", "wikitext2"]),  # other windows: the cases tokenize afresh
           *run, "--results_json", str(tmp_path / "r.json")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to drop the capabilities that bypass file permissions")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--", *cmd]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=buffered)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    reports = {name: json.loads(value) for name, value in
               (line.split(" ", 2)[1:] for line in done.stderr.splitlines() if line.startswith("fresh_process "))}
    assert reports["imported_by_the_cli"] == [], reports
    sklearn_installed = importlib.util.find_spec("sklearn") is not None
    assert reports["before_the_loading_thread"] == {"auto_classes": True, "sklearn_imported": False,
                                                    "sklearn_found": sklearn_installed}
    for (argv, code, message), (got_code, err) in zip(cases, reports["cases"], strict=True):
        assert got_code == code and message in err and "Traceback" not in err, (argv, err)
        if code:
            assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(locked) == []
    last = json.loads(done.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / "r.json").read_text())
    assert last["perplexity"]["ptb"] == pytest.approx(written["perplexity"]["ptb"], rel=1e-3)
    assert 0 < written["timings"]["startup"] < 300


@pytest.mark.parametrize("flags", [["--bit_options", "2,x"], ["--importance_weights", "a,b"]])
def test_malformed_lists_are_argparse_errors(tiny_dir, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        cli(tiny_dir, tmp_path, *flags)
    assert e.value.code == 2 and "comma-separated numbers" in capsys.readouterr().err


def test_unknown_calibration_dataset(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        oe.main([str(tiny_dir[0]), "lambada"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    code = oe.main([str(tmp_path / "nope"), "c4", "--results_json", str(tmp_path / "r.json")])
    assert code == 2 and "model directory not found" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_missing_offline_file_names_file_and_flag(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data)
    (data / "ptb" / "ptb.test.txt").unlink()
    code = oe.main([str(tiny_dir[0]), "c4", "--data_dir", str(data), "--seqlen", "64", "--nsamples", "4",
                    "--device", "cpu", "--results_json", str(tmp_path / "r.json"), "--save", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "ptb.test.txt" in err and "--data_dir" in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "s").exists()


def test_data_errors_come_before_model_errors(tiny_dir, tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_dir[0].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "model.safetensors").write_bytes(b"not weights")  # loading it (on the thread) fails
    data = tmp_path / "data"
    write_data(data)
    (data / "ptb" / "ptb.test.txt").unlink()  # found missing before the load starts
    code = oe.main([str(model), "c4", "--data_dir", str(data), "--seqlen", "64", "--device", "cpu"])
    assert code == 2 and "ptb.test.txt" in capsys.readouterr().err
    write_data(tmp_path / "short", words=20)  # found too short while tokenizing, as the load fails beside it
    code = oe.main([str(model), "ptb", "--data_dir", str(tmp_path / "short"), "--nsamples", "4", "--device", "cpu"])
    assert code == 2 and "tokens" in capsys.readouterr().err


def test_too_little_text(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_data(data, words=20)
    code = oe.main([str(tiny_dir[0]), "ptb", "--data_dir", str(data), "--nsamples", "4", "--device", "cpu"])
    assert code == 2 and "tokens" in capsys.readouterr().err


def test_save_into_non_empty_directory(tiny_dir, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    code, res = cli(tiny_dir, tmp_path, "--save", str(tmp_path / "s"))
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"] and res == {}


def test_export_without_quantization_is_refused(tiny_dir, tmp_path, capsys):
    code, _ = cli(tiny_dir, tmp_path, "--sparsity", "0.5", "--export", str(tmp_path / "p"))
    assert code == 2 and "add --wbits" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_nan_weight_is_reported_with_layer_name(tiny_dir, tmp_path, capsys):
    model = OPTForCausalLM.from_pretrained(tiny_dir[0])
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / "m" / f).write_bytes((tiny_dir[0] / f).read_bytes())
    code, _ = cli((tmp_path / "m", tiny_dir[1]), tmp_path, "--sparsity", "0.5")
    assert code == 1 and "layers.1.fc1" in capsys.readouterr().err


def test_cli_guard_target_without_wbits(tiny_dir, tmp_path, capsys):
    code, res = cli(tiny_dir, tmp_path, "--target_avg_bits", "4.0")
    assert code == 2 and res == {}
    assert "--wbits 4" in capsys.readouterr().err
