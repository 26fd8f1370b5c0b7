"""The layer loop, evaluation and the layer-selection and --save flags of opt_enhanced, checked against the
model's own forward pass and hand-written expectations. CPU, tiny models (conftest.py); seconds in all.
Run: python -m pytest -q test_pipeline.py
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import OPTForCausalLM, PreTrainedModel

import opt_enhanced as oe
import pipeline.run
from conftest import tiny_model
from modelutils import find_linears
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig
from pipeline.run import run
from systems import atomic_io
from systems.progress import Log

CPU = torch.device("cpu")


def loud(model: OPTForCausalLM) -> OPTForCausalLM:
    """Decoder weights large enough that every layer changes the residual stream a lot, as trained ones
    do (at the initial scale a layer's output is nearly its input, which hides a layer fed the wrong one)."""
    with torch.no_grad():
        for linear in find_linears(model.model.decoder.layers).values():
            linear.weight.mul_(10)
    return model


def config(**kw) -> RunConfig:
    cfg = RunConfig(model="tiny", dataset="c4", **kw)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- the sequential loop


def record_layer_inputs(model: OPTForCausalLM) -> tuple[dict[int, list[torch.Tensor]], list]:
    """Forward-pre-hooks that keep a copy of every hidden-state batch entering each decoder layer."""
    seen: dict[int, list[torch.Tensor]] = {}

    def hook(i: int):
        def keep(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, []).append(x.detach().clone())
        return keep

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.decoder.layers)]
    return seen, handles


def passes(batches: list[torch.Tensor], windows: int) -> list[torch.Tensor]:
    """The recorded batches of one layer, joined into whole passes over all calibration windows."""
    out, current = [], []
    for b in batches:
        current.append(b)
        if sum(len(c) for c in current) == windows:
            out.append(torch.cat(current))
            current = []
    assert not current, "a pass over the calibration windows was cut short"
    return out


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(wbits=3), dict(prunen=2, prunem=4, wbits=4)],
                         ids=["50%", "3-bit", "2:4+4-bit"])
def test_each_layer_is_calibrated_on_the_compressed_model_hidden_states(kw):
    """SparseGPT's sequential property: layer i sees what the *compressed* layers before it produce,
    computed as the model computes it (attention mask and positions included): every hidden state that
    enters layer i during compress() equals the compressed model's own output_hidden_states[i] on the
    calibration windows, and (for i >= 1) not the dense model's."""
    model = loud(tiny_model(attn="eager"))
    dense = copy.deepcopy(model)
    calib = torch.randint(0, 64, (7, 24), generator=torch.Generator().manual_seed(3))
    seen, handles = record_layer_inputs(model)
    try:
        compress(model, calib, config(nsamples=7, blocksize=16, batch_size=3, **kw), CPU, Log(True))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        own = model(calib, output_hidden_states=True).hidden_states
        before = dense(calib, output_hidden_states=True).hidden_states
    for i in range(model.config.num_hidden_layers):
        fed = passes(seen[i], len(calib))
        assert len(fed) >= 2, f"layer {i}: expected a calibration pass and an output pass, saw {len(fed)}"
        scale = own[i].abs().max().item()
        for x in fed:
            assert torch.allclose(x, own[i], rtol=1e-4, atol=1e-5 * scale), f"layer {i} was fed other hidden states"
            if i > 0:
                assert (x - before[i]).abs().max().item() > 1e-2 * scale, f"layer {i} saw the dense model's inputs"


# ---------------------------------------------------------------- perplexity


# ---------------------------------------------------------------- layer selection flags, end to end


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model (fp32 here, so a comparison is exact)."""
    return OPTForCausalLM.from_pretrained(model_dir).state_dict()


def run_cli(tiny_dir: tuple[Path, Path], out: Path, *flags: str) -> dict[str, torch.Tensor]:
    """opt_enhanced.main on the tiny model with --save; the saved state dict."""
    model, data = tiny_dir
    code = oe.main([str(model), "c4", "--data_dir", str(data), "--nsamples", "4", "--seqlen", "32", "--eval", "ptb",
                    "--device", "cpu", "--quiet", "--blocksize", "16", "--save", str(out), *flags])
    assert code == 0
    return weights(out)


def all_linears(layers: int = 2) -> set[str]:
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    return {f"model.decoder.layers.{i}.{n}" for i in range(layers) for n in names}


SELECTIONS = {
    # flags: the Linears whose weights must change, by the reference's rule (minlayer <= i < maxlayer and
    # prune_only in the name, all of it inverted by --invert), written out by hand
    ("--minlayer", "1", "--prune_only", "fc"): {"model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"},
    ("--maxlayer", "1", "--prune_only", "self_attn", "--invert"):
        all_linears() - {f"model.decoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")},
    ("--minlayer", "0", "--maxlayer", "1"): {n for n in all_linears() if ".layers.0." in n},
    ("--prune_only", "v_proj", "--invert", "--minlayer", "1"):
        all_linears() - {"model.decoder.layers.1.self_attn.v_proj"},
}


@pytest.mark.slow
@pytest.mark.parametrize("flags", list(SELECTIONS), ids=lambda f: " ".join(f))
def test_layer_selection_changes_exactly_the_selected_weights(tiny_dir, tmp_path, flags):
    before = weights(tiny_dir[0])
    after = run_cli(tiny_dir, tmp_path / "out", "--sparsity", "0.5", *flags)
    assert after.keys() == before.keys()
    changed = {k.removesuffix(".weight") for k in before if not torch.equal(before[k], after[k])}
    assert changed == SELECTIONS[flags]
    for name in changed:  # each selected Linear really was compressed
        w = after[name + ".weight"]
        assert int((w == 0).sum()) == w.numel() // 2, name


def assert_magnitude_pruned(dense: torch.Tensor, pruned: torch.Tensor, prunen: int = 0, prunem: int = 0) -> None:
    """Pruned = dense with its smallest |w| zeroed (half of the matrix, or prunen of every prunem in a row),
    every kept weight untouched."""
    zero = pruned == 0
    assert torch.equal(pruned[~zero], dense[~zero])
    if prunen:
        groups = dense.abs().view(dense.shape[0], -1, prunem)
        gone = zero.view(groups.shape)
        assert (gone.sum(2) == prunen).all()
        assert (groups.masked_fill(gone, math.inf).amin(2) >= groups.masked_fill(~gone, -math.inf).amax(2)).all()
    else:
        assert int(zero.sum()) == dense.numel() // 2
        assert dense.abs()[~zero].min() >= dense.abs()[zero].max()


@pytest.mark.slow
@pytest.mark.parametrize("flags,chosen", [
    (("--sparsity", "0.5", "--prune_only", "fc2"), {"model.decoder.layers.0.fc2", "model.decoder.layers.1.fc2"}),
    (("--prunen", "2", "--prunem", "4", "--prune_only", "fc", "--invert"),
     {n for n in all_linears() if ".fc" not in n}),
], ids=["50% fc2", "2:4 inverted"])
def test_gmp_is_magnitude_pruning_of_exactly_the_selected_weights(tiny_dir, tmp_path, flags, chosen):
    before = weights(tiny_dir[0])
    after = run_cli(tiny_dir, tmp_path / "out", "--gmp", *flags)
    changed = {k.removesuffix(".weight") for k in before if not torch.equal(before[k], after[k])}
    assert changed == chosen
    nm = dict(prunen=2, prunem=4) if "--prunen" in flags else {}
    for name in chosen:
        assert_magnitude_pruned(before[name + ".weight"], after[name + ".weight"], **nm)


# ---------------------------------------------------------------- --save


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under `path`, hidden ones included."""
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            out[os.path.relpath(os.path.join(root, f), path)] = Path(root, f).read_bytes()
    return out


def save_args(tiny_dir: tuple[Path, Path], target: Path) -> RunConfig:
    model, data = tiny_dir
    return oe.parse_args([str(model), "c4", "--data_dir", str(data), "--nsamples", "2", "--seqlen", "32",
                          "--eval", "ptb", "--device", "cpu", "--quiet", "--sparsity", "0.5", "--save", str(target)])


def fail_in(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make one step of writing the checkpoint fail after it has written part of its files."""
    if where == "model":
        def broken(self, directory, *a, **kw):
            Path(directory, "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    else:
        real = atomic_io.write_json

        def broken_json(obj, path):
            if path.endswith("compression.json"):
                Path(path).write_text("{")
                raise OSError("disk full")
            real(obj, path)
        monkeypatch.setattr(pipeline.run, "write_json", broken_json)  # the name save_model calls


@pytest.mark.slow
@pytest.mark.parametrize("where", ["model", "results"])
@pytest.mark.parametrize("target_exists", [False, True], ids=["new", "empty-dir"])
def test_failed_save_leaves_the_parent_directory_as_it_was(tiny_dir, tmp_path, monkeypatch, where, target_exists):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_text("mine")
    if target_exists:
        (parent / "out").mkdir()
    snapshot = tree(parent)
    fail_in(monkeypatch, where)
    with pytest.raises(OSError, match="disk full"):
        run(save_args(tiny_dir, parent / "out"))
    assert tree(parent) == snapshot


@pytest.mark.slow
def test_save_appears_whole_in_one_rename(tiny_dir, tmp_path, monkeypatch):
    """While the checkpoint is written, the target does not exist; the files go to a directory beside it
    (same file system, so the final rename is atomic), and nothing else is left in the parent."""
    parent = tmp_path / "parent"
    parent.mkdir()
    target = parent / "out"
    real = PreTrainedModel.save_pretrained
    writes = []

    def watched(self, directory, *a, **kw):
        writes.append((Path(directory), target.exists()))
        return real(self, directory, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", watched)
    run(save_args(tiny_dir, target))
    [(directory, existed)] = writes
    assert not existed and directory.parent == parent and directory != target
    assert sorted(os.listdir(parent)) == ["out"]
    files = set(os.listdir(target))
    assert {"config.json", "model.safetensors", "compression.json", "tokenizer_config.json"} <= files
    reloaded = OPTForCausalLM.from_pretrained(target)
    assert int((reloaded.model.decoder.layers[0].fc1.weight == 0).sum()) == 64 * 32 // 2


def run_cfg(model, calib, **kw) -> list:
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=calib.shape[0], blocksize=16, **kw)
    validate(cfg)
    return compress(model, calib, cfg, torch.device("cpu"), Log(True)).stats


def test_compress_tiny_model_exact_sparsity_every_layer():
    model = tiny_model()
    stats = run_cfg(model, torch.randint(0, 64, (8, 64)), sparsity=0.5)
    assert len(stats) == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    for s in stats:
        assert s.nonzero == s.rows * s.columns // 2, s.name


def test_wbits_alone_runs_gptq():
    model = tiny_model()
    before = model.model.decoder.layers[0].fc1.weight.detach().clone()
    stats = run_cfg(model, torch.randint(0, 64, (8, 64)), wbits=4)
    after = model.model.decoder.layers[0].fc1.weight
    assert not torch.equal(before, after)
    assert len(torch.unique(after[0])) <= 16
    assert all(s.bits_per_column == [4] * s.columns for s in stats)


def test_reference_filter_minlayer_prune_only():
    model = tiny_model()
    stats = run_cfg(model, torch.randint(0, 64, (4, 64)), sparsity=0.5, minlayer=1, prune_only="fc")
    assert [s.name for s in stats] == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    assert not torch.any(model.model.decoder.layers[0].fc1.weight == 0)
