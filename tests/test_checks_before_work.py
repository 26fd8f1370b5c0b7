"""Every check that can run before the work does: a compressed-tensors group size that does not tile a
Linear, an lm-eval task whose data file is missing, whose YAML does not parse or whose data is on an unreachable
hub, and damaged exports (a truncated packed file, a compressed-tensors config that contradicts its tensors): each
is exit 2 with one line naming the cause, and no layer is compressed (compress is replaced by a failure here).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import modelutils
import opt_enhanced as oe
import pipeline.run
from pipeline import lm_eval_tasks
from pipeline.run import run

QUICK = ["--nsamples", "2", "--seqlen", "32", "--quiet", "--device", "cpu", "--eval", "ptb"]


def forbid_work(monkeypatch) -> None:
    """compress() and the evaluation fail the test: the refusal must come before either."""
    monkeypatch.setattr(pipeline.run, "compress", lambda *a, **k: pytest.fail("compressed before refusing"))
    monkeypatch.setattr(pipeline.run, "perplexity", lambda *a, **k: pytest.fail("evaluated before refusing"))


@pytest.fixture
def no_work(monkeypatch):
    forbid_work(monkeypatch)


def refused(capsys, argv: list[str], *needles: str) -> str:
    assert oe.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_compressed_tensors_groups_that_do_not_tile_a_linear(tiny_dir, tmp_path, capsys, no_work):
    """The tiny OPT's Linears have 32 and 64 columns: groups of 24 tile neither; 32 is the group size to use."""
    model, data = tiny_dir
    refused(capsys, [str(model), "c4", "--data_dir", str(data), *QUICK, "--wbits", "4", "--groupsize", "24",
                     "--export", str(tmp_path / "ct"), "--export_format", "compressed-tensors"],
            "--groupsize 24", "32 columns, not a multiple of 24", "e.g. 32", "--export_format packed")
    assert os.listdir(tmp_path) == []


def write_task(directory: Path, name: str, data_files: str, dataset_path: str = "json", broken: bool = False) -> None:
    text = (f"task: {name}\ndataset_path: {dataset_path}\ndataset_kwargs:\n  data_files:\n    test: {data_files}\n"
            f"{' ' if broken else ''}test_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n')
    (directory / f"{name}.yaml").write_text(text)


@pytest.fixture
def lm_eval_ready():
    if not lm_eval_tasks.available():
        pytest.skip("lm-eval or accelerate is not installed")


def test_a_local_task_whose_data_file_is_missing(tiny_dir, tmp_path, capsys, no_work, lm_eval_ready):
    model, data = tiny_dir
    write_task(tmp_path, "tiny_missing", str(tmp_path / "nowhere.jsonl"))
    refused(capsys, [str(model), "c4", "--data_dir", str(data), *QUICK, "--lm_eval", "tiny_missing",
                     "--lm_eval_include", str(tmp_path)],
            "--lm_eval task tiny_missing", str(tmp_path / "tiny_missing.yaml"), f"{tmp_path / 'nowhere.jsonl'} does "
            "not exist")


def test_an_unparsable_task_definition_is_named_not_called_unknown(tiny_dir, tmp_path, capsys, no_work,
                                                                    lm_eval_ready):
    model, data = tiny_dir
    (tmp_path / "tiny.jsonl").write_text("{}\n")
    write_task(tmp_path, "tiny_broken", str(tmp_path / "tiny.jsonl"), broken=True)
    line = refused(capsys, [str(model), "c4", "--data_dir", str(data), *QUICK, "--lm_eval", "tiny_broken",
                            "--lm_eval_include", str(tmp_path)],
                   str(tmp_path / "tiny_broken.yaml"), "does not parse (line 6:", "fix the YAML")
    assert "unknown task" not in line


def test_a_hub_task_out_of_reach_is_refused_at_once(tiny_dir, tmp_path, capsys, no_work, lm_eval_ready,
                                                    monkeypatch):
    """lm-eval's own tasks read the hub (arc_easy: allenai/ai2_arc); offline that used to fail after the work (46 s,
    exit 1, "unexpected ConnectionError"). A local definition of a hub dataset takes the same path here, without
    indexing lm-eval's tasks."""
    monkeypatch.setattr(modelutils, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setattr(lm_eval_tasks, "hub_cached", lambda dataset: False)
    model, data = tiny_dir
    write_task(tmp_path, "tiny_hub", "unused", dataset_path="someone/some_dataset")
    refused(capsys, [str(model), "c4", "--data_dir", str(data), *QUICK, "--lm_eval", "tiny_hub",
                     "--lm_eval_include", str(tmp_path)],
            "--lm_eval task tiny_hub reads its data (someone/some_dataset) from the Hugging Face hub",
            "cannot be reached", "--lm_eval wikitext2_local")
    monkeypatch.setattr(lm_eval_tasks, "hub_cached", lambda dataset: True)  # a cached copy: datasets reads it offline
    lm_eval_tasks.check_sources(["tiny_hub"], str(tmp_path), None)


# ---------------------------------------------------------------- damaged exports


@pytest.fixture(scope="module")
def packed_export(tiny_dir, tmp_path_factory) -> Path:
    """A packed export of the tiny OPT (50% + 4-bit), written once."""
    model, data = tiny_dir
    out = tmp_path_factory.mktemp("packed") / "export"
    assert oe.main([str(model), "c4", "--data_dir", str(data), *QUICK, "--sparsity", "0.5", "--wbits", "4",
                    "--export", str(out)]) == 0
    return out


def copy_of(directory: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(directory, to)
    return to


def test_a_truncated_packed_export_is_named(packed_export, tiny_dir, tmp_path, capsys, no_work):
    damaged = copy_of(packed_export, tmp_path / "damaged")
    path = damaged / "packed.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(capsys, [str(damaged), "c4", "--data_dir", str(tiny_dir[1]), *QUICK], f"{path} is damaged",
            "export the model again")


def test_a_packed_export_whose_layout_disagrees_with_its_streams(packed_export, tiny_dir, tmp_path, capsys, no_work):
    """One code count changed in the header: the stream of that width no longer has the length the layout gives."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    damaged = copy_of(packed_export, tmp_path / "damaged")
    path = damaged / "packed.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    layouts = json.loads(meta["layers"])
    name = sorted(layouts)[0]
    layouts[name]["counts"][0] += 64
    save_file(load_file(str(path)), str(path), metadata={**meta, "layers": json.dumps(layouts)})
    refused(capsys, [str(damaged), "c4", "--data_dir", str(tiny_dir[1]), *QUICK], f"{path} is damaged",
            f"{name}.codes.4 has shape")


def test_a_compressed_tensors_config_that_contradicts_its_tensors(tiny_dir, tmp_path, capsys, monkeypatch):
    """4-bit codes under a config edited to say 8 bits: transformers loads it and fails at the first forward with a
    bare tensor-size message; it is refused before any work, naming the file and the tensor."""
    from formats.compressed_tensors_checkpoint import available

    if not available():
        pytest.skip("compressed-tensors is not installed")
    model, data = tiny_dir
    export = tmp_path / "ct"
    assert run(oe.parse_args([str(model), "c4", "--data_dir", str(data), *QUICK, "--wbits", "4", "--export",
                                 str(export), "--export_format", "compressed-tensors"]))
    config = json.loads((export / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["num_bits"] = 8
    (export / "config.json").write_text(json.dumps(config))
    forbid_work(monkeypatch)
    refused(capsys, [str(export), "c4", "--data_dir", str(data), *QUICK], str(export / "model.safetensors"),
            "weight_packed has shape", "8 bits", "export the model again")
