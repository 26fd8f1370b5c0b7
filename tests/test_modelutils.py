"""modelutils.py: where the layers live, what a layer is fed, and how transformers is imported."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import OPTForCausalLM

from conftest import ROOT, tiny_model
from modelutils import find_linears, resident

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


def test_transformers_is_imported_without_scikit_learn_which_stays_importable():
    """modelutils.import_transformers keeps transformers from importing scikit-learn (seconds of start-up, unused),
    leaves it importable afterwards, and falls back to an ordinary import when a hidden package is one transformers
    needs (safetensors)."""
    pytest.importorskip("sklearn")
    root = ROOT
    checks = {
        "hidden": "import importlib.util, sys, modelutils; modelutils.import_transformers(); "
                  "assert 'transformers.generation' in sys.modules and 'sklearn' not in sys.modules; "
                  "assert importlib.util.find_spec('sklearn.metrics') is not None",  # found, not imported: 1 s less
        "needed": "import sys, modelutils; modelutils.import_transformers(('safetensors',)); "
                  "import transformers; assert sys.modules['safetensors'] is not None",
    }
    procs = {k: subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, code in checks.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}"


def test_calibration_forward_stops_after_the_last_input_and_sees_what_a_whole_forward_does():
    """feed_inputs against plain forward hooks over whole forwards: the same inputs reach every Linear, and
    after the first batch no forward goes past the last Linear (fc2 never computes its output again)."""
    from modelutils import capture_layer_inputs, decoder_layers, feed_inputs

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
