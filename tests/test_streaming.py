"""--stream (streaming.py): decoder layers read from safetensors when a walk reaches them and written back
compressed, on the CPU with tiny models: the same weights and perplexities as a run that holds the model,
a from_pretrained checkpoint from --save, a few layers in host memory at a time. Seconds.
Run: python -m pytest -q test_streaming.py
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTForCausalLM

import opt_enhanced as oe
import pipeline.lm_eval_tasks
from conftest import tiny_model
from modelutils import ModelError, capture_layer_inputs, decoder_layers, load_model, walk_layers
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig, UsageError
from systems import offload, streaming
from systems.progress import Log

CPU = torch.device("cpu")


def run(tiny_dir: tuple[Path, Path], out: Path, *flags: str) -> dict:
    model, data = tiny_dir
    results = out.parent / f"{out.name}.json"
    code = oe.main([str(model), "c4", "--data_dir", str(data), "--nsamples", "4", "--seqlen", "32", "--eval", "ptb",
                    "--device", "cpu", "--quiet", "--blocksize", "16", "--sparsity", "0.5", "--wbits", "4",
                    "--save", str(out), "--results_json", str(results), *flags])
    assert code == 0
    return json.loads(results.read_text())


@pytest.mark.slow
def test_a_streamed_run_gives_the_in_memory_runs_weights_and_perplexity(tiny_dir, tmp_path):
    held = run(tiny_dir, tmp_path / "held")
    streamed = run(tiny_dir, tmp_path / "streamed", "--stream")
    assert streamed["perplexity"] == held["perplexity"]
    a = OPTForCausalLM.from_pretrained(tmp_path / "held").state_dict()
    b = OPTForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert {"layer-00000.safetensors", "layer-00001.safetensors", streaming.REST, streaming.INDEX} <= set(files)
    gc.collect()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the scratch directory has gone


def save_sharded(tmp_path: Path, layers: int = 4) -> tuple[Path, OPTForCausalLM]:
    model = tiny_model(layers=layers)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / streaming.INDEX).is_file()
    return tmp_path / "sharded", model


class CountingStore(streaming.LayerStore):
    """A LayerStore that counts the layers holding host tensors, and the most at once."""

    def __init__(self, store: streaming.LayerStore) -> None:
        super().__init__(store.prefix, store.sources, store.scratch_parent)
        self.loaded = self.most = 0

    def load(self, index: int, layer: torch.nn.Module) -> None:
        super().load(index, layer)
        self.loaded += 1
        self.most = max(self.most, self.loaded)

    def unload(self, index: int, layer: torch.nn.Module, visited: bool) -> None:
        super().unload(index, layer, visited)
        self.loaded -= 1


@pytest.mark.parametrize("overlap", [False, offload.HostStreams()], ids=["in line", "mover"])
def test_a_streamed_walk_holds_a_few_layers_and_computes_what_the_held_model_does(tmp_path, overlap):
    path, held = save_sharded(tmp_path)
    model = streaming.load_streamed(str(path))
    store = model.layer_store = CountingStore(model.layer_store)
    layers = decoder_layers(model)
    assert all(p.device.type == "meta" for p in layers.parameters())
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_layer_inputs(model, ids, CPU, batch_size=2)
    expected = capture_layer_inputs(held, ids, CPU, batch_size=2)
    assert torch.equal(inputs.hidden, expected.hidden)
    for _ in walk_layers(model, CPU, inputs, overlap=overlap):
        pass
    for _ in walk_layers(held, CPU, expected, overlap=False):
        pass
    assert torch.equal(inputs.hidden, expected.hidden)
    assert store.most == (1 if overlap is False else 2) and store.loaded == 0  # the mover: i, and i+1 once i-1 left
    assert all(p.device.type == "meta" for p in layers.parameters()) and not store.written


def test_a_writing_walk_keeps_the_changed_layers_and_later_walks_read_them(tmp_path):
    path, _ = save_sharded(tmp_path, layers=3)
    model = streaming.load_streamed(str(path), scratch_parent=str(tmp_path))
    with streaming.writing(model):
        for i, layer in walk_layers(model, CPU, overlap=offload.HostStreams()):
            with torch.no_grad():
                layer.fc1.weight.fill_(i + 1)
    for i, layer in walk_layers(model, CPU):  # not writing: read back, left as read
        assert (layer.fc1.weight == i + 1).all()
        layer.fc1.weight.data.zero_()
    scratch = Path(model.layer_store.scratch)
    assert scratch.parent == tmp_path and len(list(scratch.iterdir())) == 3
    saved = load_file(scratch / streaming.layer_file(2))
    assert (saved["model.decoder.layers.2.fc1.weight"] == 3).all()
    out = tmp_path / "out"
    out.mkdir()
    streaming.save_streamed(model, str(out))
    reloaded = load_model(str(out))
    assert all((layer.fc1.weight == i + 1).all() for i, layer in enumerate(decoder_layers(reloaded)))
    del model
    gc.collect()
    assert not scratch.exists()


def test_hub_checkpoints_without_the_model_prefix_stream(tmp_path):
    """facebook/opt-* checkpoints name their tensors "decoder.layers.0...." (no "model."), the head tied."""
    held = tiny_model(layers=2)
    held.config.save_pretrained(tmp_path)
    state = {k.removeprefix("model."): v for k, v in held.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata=streaming.METADATA)
    model = streaming.load_streamed(str(tmp_path))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=2, blocksize=16, sparsity=0.5)
    calibration = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with streaming.writing(model):
        compress(model, calibration, cfg, CPU, Log(True))
    compress(held, calibration, cfg, CPU, Log(True))
    for i, layer in walk_layers(model, CPU):
        for (name, a), b in zip(layer.named_parameters(), decoder_layers(held)[i].parameters()):
            assert torch.equal(a, b), name


def test_a_checkpoint_missing_a_layer_tensor_is_refused(tmp_path):
    held = tiny_model(layers=2)
    held.config.save_pretrained(tmp_path)
    state = {k: v for k, v in held.state_dict().items() if k not in ("lm_head.weight", "model.decoder.layers.1.fc2.bias")}
    save_file(state, tmp_path / "model.safetensors", metadata=streaming.METADATA)
    with pytest.raises(ModelError, match=r"1 missing \(model.decoder.layers.1.fc2.bias\)"):
        streaming.load_streamed(str(tmp_path))


@pytest.mark.parametrize("flags,message", [
    (["--export", "x"], "--export packs the whole model"),
    (["--lm_eval", "hellaswag"], "drop --offload/--stream"),
    (["--target_avg_bits", "4", "--bit_scope", "model"], "drop --offload/--stream"),
])
def test_stream_refuses_what_needs_the_whole_model(tmp_path, flags, message):
    cfg = oe.parse_args(["m", "c4", "--wbits", "4", "--stream", *[str(tmp_path / f) if f == "x" else f for f in flags]])
    with pytest.raises(UsageError, match=message):
        validate(cfg)


def test_a_layer_written_twice_is_read_whole_each_time(tmp_path):
    """The second writing walk reads each layer from the scratch file it then rewrites."""
    path, _ = save_sharded(tmp_path, layers=2)
    model = streaming.load_streamed(str(path))
    for value in (1.0, 2.0):
        with streaming.writing(model):
            for _, layer in walk_layers(model, CPU):
                with torch.no_grad():
                    layer.fc1.weight.add_(value)
    again = streaming.load_streamed(str(path))
    for (i, layer), (_, original) in zip(walk_layers(model, CPU), walk_layers(again, CPU)):
        assert torch.equal(layer.fc1.weight, original.fc1.weight + 1.0 + 2.0)
        assert torch.equal(layer.fc2.weight, original.fc2.weight)


def test_stream_refusal_comes_before_the_lm_eval_installation(monkeypatch):
    """No installation makes --lm_eval work with --stream, so that is said first, where lm-eval is missing too."""
    monkeypatch.setattr(pipeline.lm_eval_tasks, "available", lambda: False)
    cfg = oe.parse_args(["m", "c4", "--wbits", "4", "--stream", "--lm_eval", "hellaswag"])
    with pytest.raises(UsageError, match="drop --offload/--stream"):
        validate(cfg)
