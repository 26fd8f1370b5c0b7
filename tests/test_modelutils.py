"""modelutils.py: where the layers live, what a layer is fed, and how transformers is imported."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
from transformers import OPTForCausalLM

from conftest import tiny_model
from modelutils import find_linears, import_hiding, resident

CPU = torch.device("cpu")


def loud(model: OPTForCausalLM) -> OPTForCausalLM:
    """Decoder weights large enough that every layer changes the residual stream a lot, as trained ones do."""
    with torch.no_grad():
        for linear in find_linears(model.model.decoder.layers).values():
            linear.weight.mul_(10)
    return model


def test_resident_ignores_the_device_index():
    """The layers report "cuda:0" where the run asks for "cuda" (here: cpu vs cpu:0); both mean resident."""
    layers = tiny_model().model.decoder.layers
    assert resident(layers, torch.device("cpu")) and resident(layers, torch.device("cpu", 0))
    assert not resident(layers, torch.device("meta"))


def test_a_hidden_package_is_skipped_by_an_optional_import_and_imported_by_a_needed_one(tmp_path, monkeypatch):
    """import_hiding, which keeps scikit-learn out of transformers' import (the CLI's child process in test_cli checks
    that for transformers itself): a package that imports the hidden one only if it is installed gets None and
    leaves it unimported yet importable; one that needs it gets it, through the ordinary import made again."""
    (tmp_path / "extra.py").write_text("VALUE = 42\n")
    (tmp_path / "optional_user.py").write_text("try:\n    import extra\nexcept ImportError:\n    extra = None\n")
    (tmp_path / "needy_user.py").write_text("import extra\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("extra", "optional_user", "needy_user"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    import_hiding(("extra",), lambda: importlib.import_module("optional_user"))
    assert sys.modules["optional_user"].extra is None and "extra" not in sys.modules
    assert importlib.import_module("extra").VALUE == 42  # importable again afterwards
    del sys.modules["extra"]

    import_hiding(("extra",), lambda: importlib.import_module("needy_user"))
    assert sys.modules["needy_user"].extra.VALUE == 42 and sys.modules["extra"] is sys.modules["needy_user"].extra


def test_calibration_forward_stops_after_the_last_input_and_sees_what_a_whole_forward_does():
    """feed_inputs against plain forward hooks over whole forwards: the same inputs reach every Linear, and
    after the first batch no forward goes past the last Linear (fc2 never computes its output again)."""
    from modelutils import capture_layer_inputs, decoder_layers, feed_inputs, layer_output

    model = loud(tiny_model())
    ids = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(model, ids, CPU, 2)
    layer = decoder_layers(model)[0]
    linears = find_linears(layer)
    whole: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    handles = [m.register_forward_hook(lambda _m, inp, _out, n=n: whole[n].append(inp[0].clone()))
               for n, m in linears.items()]
    with torch.no_grad():
        for start in range(0, 5, 2):
            layer(inputs.hidden[start:start + 2], **inputs.kwargs)
    for h in handles:
        h.remove()
    outputs = []
    counter = linears["fc2"].register_forward_hook(lambda *_: outputs.append(1))
    fed: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    with torch.no_grad():
        feed_inputs(layer, linears, lambda n, x: fed[n].append(x.clone()), inputs)
    counter.remove()
    for n in linears:
        assert len(fed[n]) == 3 and all(torch.equal(a, b) for a, b in zip(fed[n], whole[n])), n
    assert len(outputs) == 1  # the first batch runs whole (it counts each Linear's calls); the others stop
    # with `out` (the model-scope plan's walk): the same inputs, every batch whole, the layer's output written
    with torch.no_grad():
        expected = torch.cat([layer_output(layer(inputs.hidden[s:s + 2], **inputs.kwargs)) for s in range(0, 5, 2)])
    again: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    with torch.no_grad():
        feed_inputs(layer, linears, lambda n, x: again[n].append(x.clone()), inputs, out=inputs.hidden)
    for n in linears:
        assert len(again[n]) == 3 and all(torch.equal(a, b) for a, b in zip(again[n], whole[n])), n
    assert torch.equal(inputs.hidden, expected)
