"""The overlapped layer walk (offload.py) on the CPU: the mover's bookkeeping with stand-in streams
(HostStreams, or ones that record every call), compared with moving layers in line. A few seconds.
Run: python -m pytest -q test_offload.py
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from typing import Any

import pytest
import torch

import pipeline.calibrate
import pipeline.compress
from conftest import tiny_model
from modelutils import capture_layer_inputs, decoder_layers, find_linears, forward_layer, walk_layers
from pipeline.calibrate import collect_hessians
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig
from pipeline.evaluate import eval_windows, perplexity
from pipeline.placement import place
from sparsegpt_enhanced import SparseGPT
from systems import offload
from systems.progress import Log

CPU = torch.device("cpu")


def loud(model: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that each layer changes the residual stream (a wrong layer input shows)."""
    with torch.no_grad():
        for linear in find_linears(decoder_layers(model)).values():
            linear.weight.mul_(10)
    return model


class RecordingStreams(offload.HostStreams):
    """HostStreams that name the two streams and every event, and log each call (from both threads)."""

    def __init__(self, fail_on_copy: int | None = None, error: BaseException = RuntimeError("copy failed")) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.events = 0
        self.copies = 0
        self.fail_on_copy = fail_on_copy
        self.error = error

    def side(self, dev: torch.device) -> Any:
        return "side"

    def current(self, dev: torch.device) -> Any:
        return "compute"

    def using(self, stream: Any):
        self.copies += 1
        if self.copies == self.fail_on_copy:
            raise self.error
        self.calls.append(("using", stream))
        return super().using(stream)

    def record(self, stream: Any) -> Any:
        self.events += 1
        event = (stream, self.events)
        self.calls.append(("record", event))
        return event

    def wait(self, stream: Any, event: Any) -> None:
        self.calls.append(("wait", stream, event))

    def synchronize(self, event: Any) -> None:
        self.calls.append(("synchronize", event))

    def used_on(self, tensor: torch.Tensor, stream: Any) -> None:
        self.calls.append(("used_on", stream))


def hidden_of(model: torch.nn.Module, windows: int = 4, seqlen: int = 16):
    ids = torch.randint(0, 64, (windows, seqlen), generator=torch.Generator().manual_seed(1))
    return capture_layer_inputs(model, ids, CPU, batch_size=2)


def host_pointers(model: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for p in decoder_layers(model).parameters()]


# ---------------------------------------------------------------- same results as moving in line


@pytest.mark.parametrize("flags", [dict(sparsity=0.5, wbits=4), dict(wbits=3, target_avg_bits=3.0)],
                         ids=["50%+4bit", "mixed"])
def test_compress_and_evaluate_through_the_mover_give_the_same_weights_and_perplexity(monkeypatch, flags):
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=4, blocksize=16, **flags)
    validate(cfg)
    calibration = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (1, 6 * 32), generator=torch.Generator().manual_seed(2))
    in_line, moved = loud(tiny_model(layers=3)), loud(tiny_model(layers=3))
    before = host_pointers(moved)

    monkeypatch.setattr(offload, "OVERLAP", False)
    compress(in_line, calibration, cfg, CPU, Log(True))
    expected = perplexity(in_line, eval_windows(ids, 32), CPU, 2, whole_model=False)
    monkeypatch.setattr(offload, "OVERLAP", offload.HostStreams())
    compress(moved, calibration, cfg, CPU, Log(True))
    got = perplexity(moved, eval_windows(ids, 32), CPU, 2, whole_model=False)

    for (name, a), b in zip(in_line.named_parameters(), moved.parameters()):
        assert torch.equal(a, b), name
    assert got == expected
    assert (moved.model.decoder.layers[2].fc1.weight == 0).float().mean() >= 0.5 or not cfg.prune.active
    assert host_pointers(moved) == before  # every layer ended in its own host tensors, written in place


# ---------------------------------------------------------------- the bookkeeping


def test_walk_fetches_ahead_sends_home_in_order_and_holds_two_layers():
    model = loud(tiny_model(layers=4))
    layers = decoder_layers(model)
    inputs = hidden_of(model)
    expected = replace(inputs, hidden=inputs.hidden.clone())
    homes = host_pointers(model)
    streams, stats = RecordingStreams(), offload.MoveStats()
    scaled = {}
    for i, layer in walk_layers(model, CPU, inputs, overlap=streams, moves=stats):
        stats.note("step", i)
        assert all(p.data_ptr() not in homes for p in layer.parameters())  # the caller works on copies
        if i + 1 < len(layers):
            assert all(p.data_ptr() in homes for p in layers[i + 1].parameters())  # the next one is not in use
        with torch.no_grad():
            layer.fc1.weight.data = layer.fc1.weight.data * 0.5  # replaced, as the solver does
            layer.fc2.weight.mul_(2.0)  # changed in place
        scaled[i] = (layer.fc1.weight.clone(), layer.fc2.weight.clone())
    reference = loud(tiny_model(layers=4))
    with torch.no_grad():
        for layer in decoder_layers(reference):
            layer.fc1.weight.mul_(0.5)
            layer.fc2.weight.mul_(2.0)
            forward_layer(layer, expected, expected.hidden)
    assert torch.equal(inputs.hidden, expected.hidden)  # the walk ran each layer as the caller left it

    main = [e for e in stats.log if e[0] in ("fetch", "arrive", "step", "depart")]
    assert main == [("fetch", 0), ("arrive", 0), ("fetch", 1), ("step", 0), ("depart", 0),
                    ("arrive", 1), ("fetch", 2), ("step", 1), ("depart", 1),
                    ("arrive", 2), ("fetch", 3), ("step", 2), ("depart", 2),
                    ("arrive", 3), ("step", 3), ("depart", 3)]
    worker = [e for e in stats.log if e[0] in ("brought", "sent")]
    assert worker == [("brought", 0), ("brought", 1), ("sent", 0), ("brought", 2), ("sent", 1),
                      ("brought", 3), ("sent", 2), ("sent", 3)]  # i-1 leaves before i+1 comes
    assert stats.peak_on_device == 2 and stats.on_device == 0
    assert host_pointers(model) == homes
    for i, layer in enumerate(layers):
        assert torch.equal(layer.fc1.weight, scaled[i][0]) and torch.equal(layer.fc2.weight, scaled[i][1])
        assert all(p.device == CPU for p in layer.parameters())


def test_each_copy_is_ordered_against_the_computation_by_events():
    """The caller's stream waits for each layer's arrival; the side stream waits for the caller's
    stream before copying a layer back; the host waits for that copy before reading it."""
    model = tiny_model(layers=3)
    inputs = hidden_of(model)
    streams = RecordingStreams()
    slots = len(list(model.model.decoder.layers[0].parameters()))
    for _ in walk_layers(model, CPU, inputs, overlap=streams):
        pass
    calls = streams.calls
    recorded = [c[1] for c in calls if c[0] == "record"]
    side_events = [e for e in recorded if e[0] == "side"]
    compute_events = [e for e in recorded if e[0] == "compute"]
    assert len(compute_events) == 3  # one "done" per layer
    waits = [c for c in calls if c[0] == "wait"]
    arrivals = [c[2] for c in waits if c[1] == "compute"]
    assert len(arrivals) == 3 and all(e[0] == "side" for e in arrivals)  # compute waits for each fetch's copy
    assert sorted(c[2] for c in waits if c[1] == "side") == compute_events  # each copy home waits for compute
    synced = {c[1] for c in calls if c[0] == "synchronize"}
    landed = [e for e in side_events if e not in arrivals]
    assert len(landed) == 3 and set(landed) <= synced  # the host reads each copy home after it lands
    assert set(arrivals[:-1]) <= synced  # the inbound buffer is reused after the GPU read it
    assert sum(1 for c in calls if c == ("used_on", "compute")) == 3 * slots


def test_a_failing_step_leaves_every_layer_at_home_as_the_caller_left_it():
    model = tiny_model(layers=4)
    inputs = hidden_of(model)
    homes = host_pointers(model)
    stats = offload.MoveStats()
    with pytest.raises(KeyError, match="stop"):
        for i, layer in walk_layers(model, CPU, inputs, overlap=offload.HostStreams(), moves=stats):
            with torch.no_grad():
                layer.fc1.weight.fill_(float(i + 1))
            if i == 1:
                raise KeyError("stop")
    layers = decoder_layers(model)
    assert host_pointers(model) == homes and stats.on_device == 0 and stats.peak_on_device == 2
    assert (layers[1].fc1.weight == 2).all() and not (layers[2].fc1.weight == 3).all()
    assert not [t for t in threading.enumerate() if t.name.startswith("layer-mover")]


def test_a_failing_copy_fails_the_walk():
    model = tiny_model(layers=3)
    inputs = hidden_of(model)
    with pytest.raises(RuntimeError, match="copy failed"):
        for _ in walk_layers(model, CPU, inputs, overlap=RecordingStreams(fail_on_copy=4)):
            pass
    assert all(p.device == CPU for p in model.parameters())


def test_a_layer_that_does_not_fit_beside_the_last_is_fetched_again_after_it_left():
    model, reference = tiny_model(layers=3), tiny_model(layers=3)
    inputs = hidden_of(model)
    expected = replace(inputs, hidden=inputs.hidden.clone())
    stats = offload.MoveStats()
    streams = RecordingStreams(fail_on_copy=2, error=torch.OutOfMemoryError("no room"))  # layer 1's fetch
    for _ in walk_layers(model, CPU, inputs, overlap=streams, moves=stats):
        pass
    for _ in walk_layers(reference, CPU, expected, overlap=False):
        pass
    assert torch.equal(inputs.hidden, expected.hidden)
    worker = [e for e in stats.log if e[0] in ("refetch", "brought", "sent")]
    assert worker.index(("sent", 0)) < worker.index(("brought", 1)) and ("refetch", 1) in stats.log


def test_staging_views_pack_tensors_of_any_dtype_and_shape_apart():
    tensors = [torch.randn(3, 5).half(), torch.tensor(2.5), torch.zeros(0), torch.arange(7) > 3,
               torch.arange(11, dtype=torch.int64), torch.randn(2, 3, 4, dtype=torch.float64)]
    staging = offload.Staging(pin=False)
    views = staging.views(tensors)
    spans = []
    for view, tensor in zip(views, tensors):
        assert view.shape == tensor.shape and view.dtype == tensor.dtype and view.is_contiguous()
        view.copy_(tensor)
        if not tensor.numel():
            continue  # an empty view has no address
        start = view.data_ptr() - staging.buffer.data_ptr()
        assert start % offload.ALIGN == 0
        spans.append((start, start + tensor.numel() * tensor.element_size()))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(torch.equal(v, t) for v, t in zip(views, tensors))
    small = staging.buffer
    assert staging.views(tensors[:2])[0].data_ptr() == small.data_ptr()  # reused when they fit
    staging.views([torch.zeros(10_000)])
    assert staging.buffer.numel() >= 40_000


def test_streams_for_overlaps_only_offloaded_layers_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert offload.streams_for(cpu, cpu) is None
    assert type(offload.streams_for(cpu, cuda)) is offload.Streams
    assert offload.streams_for(cuda, cuda) is None  # resident layers do not move
    assert offload.streams_for(cpu, cuda, overlap=False) is None
    host = offload.HostStreams()
    assert offload.streams_for(cpu, cpu, overlap=host) is host


def test_compress_frees_a_layers_hessians_before_the_next_layers_are_built(monkeypatch):
    """At OPT-175B width one layer's X^T X and factors are ~20 GB of GPU memory: two layers' must not coexist."""
    alive: list[weakref.ref] = []

    class Tracked(SparseGPT):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            alive.append(weakref.ref(self))

    collect = collect_hessians
    checked = []

    def collect_after_the_last_layers_are_gone(*args, **kw):
        checked.append([r() is None for r in alive])
        return collect(*args, **kw)

    monkeypatch.setattr(pipeline.calibrate, "SparseGPT", Tracked)
    monkeypatch.setattr(pipeline.compress, "collect_hessians", collect_after_the_last_layers_are_gone)
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=2, blocksize=16, sparsity=0.5)
    compress(tiny_model(layers=3), torch.randint(0, 64, (2, 16)), cfg, CPU, Log(True))
    assert len(checked) == 3 and checked[0] == [] and all(all(gone) and gone for gone in checked[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real streams, events and pinned buffers")
def test_on_cuda_overlapped_and_in_line_moves_give_identical_weights_and_perplexity(monkeypatch):
    dev = torch.device("cuda")
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=4, blocksize=16, sparsity=0.5, wbits=4)
    validate(cfg)
    calibration = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (1, 6 * 32), generator=torch.Generator().manual_seed(2))
    results = []
    for overlap in (False, True):
        monkeypatch.setattr(offload, "OVERLAP", overlap)
        model = loud(tiny_model(layers=4)).half()
        place(model, dev, offload=True)
        compress(model, calibration, cfg, dev, Log(True))
        results.append((perplexity(model, eval_windows(ids, 32), dev, 2), {n: p.cpu() for n, p in model.named_parameters()}))
        assert all(p.device.type == "cpu" for p in decoder_layers(model).parameters())
    (ppl_a, a), (ppl_b, b) = results
    assert ppl_a == ppl_b and all(torch.equal(a[n], b[n]) for n in a)
