"""Model scope (pipeline/model_scope.py): the loss sensitivity of every Linear output, against autograd."""
from __future__ import annotations

import pytest
import torch
from transformers import OPTForCausalLM

from conftest import tiny_model
from modelutils import capture_layer_inputs, find_linears
from pipeline.model_scope import output_sensitivity


def loud_tiny_model() -> OPTForCausalLM:
    """tiny_model with weights large enough that each layer changes the residual stream, as trained ones do
    (at the initial scale a layer's output is nearly its input, which hides a layer fed the wrong input)."""
    model = tiny_model()
    with torch.no_grad():
        for linear in find_linears(model.model.decoder.layers).values():
            linear.weight.mul_(10)
    return model


def test_output_sensitivity_is_the_mean_squared_loss_gradient_of_each_output():
    model = loud_tiny_model()
    ids = torch.randint(0, 64, (6, 32))
    before = {n: p.clone() for n, p in model.named_parameters()}
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=4)
    lines = []
    fisher = output_sensitivity(model, ids, inputs, torch.device("cpu"), lines.append)
    assert [line.split(",")[0] for line in lines] == ["loss sensitivity: windows 4/6", "loss sensitivity: windows 6/6"]
    assert lines[0].endswith("of the sensitivity pass left") and lines[1].endswith("the sensitivity pass done")
    assert len(fisher) == 12 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # independently: autograd of the summed next-token loss w.r.t. layer 1's fc2 output, all windows at once
    outputs = []
    handle = model.model.decoder.layers[1].fc2.register_forward_hook(lambda m, x, y: outputs.append(y) or y.retain_grad())
    logits = model(ids).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    handle.remove()
    expected = (outputs[0].grad.reshape(-1, 32) ** 2).sum(0) / ids[:, 1:].numel()
    assert torch.allclose(fisher["model.decoder.layers.1.fc2"], expected, rtol=1e-4)
    assert fisher["model.decoder.layers.1.fc2"].shape == (32,) and fisher["model.decoder.layers.0.fc1"].shape == (64,)


def test_output_sensitivity_of_a_half_precision_model_runs_in_fp32_and_restores_the_weights():
    model = loud_tiny_model().half().float()  # the reference has the fp16 model's weights
    ids = torch.randint(0, 64, (6, 32))
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=3)
    reference = output_sensitivity(model, ids, inputs, torch.device("cpu"))
    model.half()
    before = {n: p.clone() for n, p in model.named_parameters()}
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=3)
    fisher = output_sensitivity(model, ids, inputs, torch.device("cpu"))
    assert all(p.dtype == torch.float16 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    for name, f in reference.items():  # only the layer-0 inputs are rounded to fp16
        assert fisher[name].dtype == torch.float32 and torch.allclose(fisher[name], f, rtol=0.02, atol=0)


def test_output_sensitivity_refuses_layers_away_from_the_device():
    """With --offload the layers live on the CPU while the run's device is the GPU (here: meta)."""
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 16))
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=2)
    with pytest.raises(RuntimeError, match="drop --offload"):
        output_sensitivity(model, ids, inputs, torch.device("meta"))


def test_the_plan_takes_the_sensitivity_of_the_first_windows_when_told():
    """RunConfig.sensitivity_windows: the plan's sensitivities are the pass over the first windows alone."""
    import dataclasses

    import opt_enhanced as oe
    from pipeline.model_scope import plan_model_bits
    from systems.progress import Log

    model = loud_tiny_model()
    ids = torch.randint(0, 64, (6, 32))
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"), batch_size=3)
    expected = output_sensitivity(model, ids[:2], inputs, torch.device("cpu"))
    everything = output_sensitivity(model, ids, inputs, torch.device("cpu"))
    cfg = dataclasses.replace(oe.parse_args(["m", "c4", "--wbits", "4", "--target_avg_bits", "4", "--nsamples", "6",
                                             "--device", "cpu"]), sensitivity_windows=2)
    plan = plan_model_bits(model, ids, inputs, cfg, torch.device("cpu"), Log(quiet=True))
    assert set(plan.sensitivity) == set(expected)
    assert all(torch.equal(plan.sensitivity[n], expected[n]) for n in expected)
    assert not all(torch.equal(expected[n], everything[n]) for n in expected)
