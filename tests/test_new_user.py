"""What a new user meets: an lm-eval task that works offline out of the box (`wikitext2_local`, from
--data_dir), --quiet that is quiet (lm-eval's, datasets' and transformers' bars and log lines too), and saved or
exported configs that keep the source model's `use_cache`."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import opt_enhanced as oe
import pipeline.cli
from pipeline import lm_eval_tasks
from pipeline.run import run

QUICK = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--eval", "ptb"]
SHARED_WIKITEXT = Path(__file__).resolve().parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.mark.skipif(not lm_eval_tasks.available(), reason="lm-eval or accelerate is not installed")
def test_the_bundled_task_runs_offline_and_quietly(tiny_dir, tmp_path, capfd):
    """`--lm_eval wikitext2_local --quiet`: lm-eval's wikitext metrics on the data directory's WikiText-2 test text
    (the tiny one has no headings: one article), nothing on stderr, the results line alone on stdout."""
    model, data = tiny_dir
    capfd.readouterr()
    code = oe.main([str(model), "c4", "--data_dir", str(data), *QUICK, "--quiet", "--wbits", "4", "--lm_eval",
                    "wikitext2_local", "--results_json", str(tmp_path / "r.json")])
    out, err = capfd.readouterr()
    assert code == 0 and err == "", err
    assert len(out.strip().splitlines()) == 1 and json.loads(out)["outputs"]["results_json"]
    scores = json.loads((tmp_path / "r.json").read_text())["lm_eval"]["wikitext2_local"]
    page = (data / "wikitext-2-raw" / "wiki.test.raw").read_text()
    words, size = len(re.split(r"\s+", page)), len(page.encode())
    nll_by_words = math.log(scores["word_perplexity,none"]) * words  # the same log-likelihood, three ways
    assert nll_by_words == pytest.approx(math.log(scores["byte_perplexity,none"]) * size, rel=1e-9)
    assert scores["bits_per_byte,none"] == pytest.approx(math.log2(scores["byte_perplexity,none"]), rel=1e-9)
    assert 1 < scores["byte_perplexity,none"] < 260  # better than chance over the byte-level vocabulary


@pytest.mark.skipif(not SHARED_WIKITEXT.is_file(), reason="../shared/data is absent")
def test_the_bundled_task_has_the_62_wikitext2_test_articles():
    articles = lm_eval_tasks.wikitext2_articles(str(SHARED_WIKITEXT))
    text = SHARED_WIKITEXT.read_text()
    assert len(articles) == 62 and articles[0].startswith(" = Robert Boulter = \n")
    assert "".join(articles) == text[text.index(" = Robert Boulter = \n"):]  # every line, in order, once


@pytest.mark.skipif(not lm_eval_tasks.available(), reason="lm-eval or accelerate is not installed")
def test_the_bundled_task_needs_the_data_directory(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline.cli, "check_model", lambda cfg: pytest.fail("checked the model before the tasks"))
    assert oe.main([str(tiny_dir[0]), "c4", *QUICK, "--lm_eval", "wikitext2_local"]) == 2
    assert "--lm_eval wikitext2_local reads wikitext-2-raw/wiki.test.raw under --data_dir: add --data_dir" in \
        capsys.readouterr().err


def test_quiet_save_draws_no_progress_bar(tiny_dir, tmp_path, capfd):
    """transformers' "Writing model shards" bar of --save, with its bars switched on as a fresh process has them."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        model, data = tiny_dir
        capfd.readouterr()
        assert oe.main([str(model), "c4", "--data_dir", str(data), *QUICK, "--quiet", "--sparsity", "0.5",
                        "--save", str(tmp_path / "s")]) == 0
        assert capfd.readouterr().err == ""
    finally:  # as the other tests of this process had it
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("use_cache", [True, False])
def test_saved_and_exported_configs_keep_the_sources_use_cache(tiny_dir, tmp_path, use_cache):
    import shutil

    from formats.compressed_tensors_checkpoint import available

    model = Path(shutil.copytree(tiny_dir[0], tmp_path / "m"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "use_cache": use_cache}))
    outputs = {"save": tmp_path / "s", "export": tmp_path / "e"}
    run(oe.parse_args([str(model), "c4", "--data_dir", str(tiny_dir[1]), *QUICK, "--quiet", "--wbits", "4",
                          "--save", str(outputs["save"]), "--export", str(outputs["export"])]))
    if available():
        outputs["compressed-tensors"] = tmp_path / "ct"
        run(oe.parse_args([str(model), "c4", "--data_dir", str(tiny_dir[1]), *QUICK, "--quiet", "--wbits", "4",
                              "--export", str(outputs["compressed-tensors"]), "--export_format", "compressed-tensors"]))
    for name, directory in outputs.items():
        assert json.loads((directory / "config.json").read_text())["use_cache"] is use_cache, name
