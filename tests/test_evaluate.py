"""Perplexity (pipeline/evaluate.py): the SparseGPT protocol, against the model's own loss."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import OPTForCausalLM

from conftest import tiny_model
from pipeline.evaluate import eval_windows, perplexity

CPU = torch.device("cpu")


def test_known_tiny_perplexity_uniform_logits():
    """Zero output embedding => uniform logits => perplexity equals the vocabulary size."""
    model = tiny_model(vocab=50)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = torch.randint(0, 50, (1, 64 * 3 + 5))
    assert abs(perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 2) - 50) < 1e-3


def test_perplexity_batching_does_not_change_result():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 64 * 5))
    a = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 1)
    b = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 4)
    assert abs(a - b) / a < 1e-5


def test_whole_model_and_layer_by_layer_evaluation_agree():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 64 * 5 + 7))
    a = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 2, whole_model=True)
    b = perplexity(model, eval_windows(ids, 64), torch.device("cpu"), 3, whole_model=False)
    assert abs(a - b) / a < 1e-4


def peaked_model() -> OPTForCausalLM:
    """Logits far from uniform: OPT ties the output embedding to the input one, so scaling it makes the
    model confident (its residual stream still carries the current token). Eager attention, so that a
    layer run without the decoder's attention mask sees later tokens (sdpa would fall back to causal)."""
    model = tiny_model(attn="eager")
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(20)
    return model


def patterned_ids(seqlen: int, windows: int, tail: int) -> torch.Tensor:
    """Windows alternately of one repeated token (cheap to predict for this model) and random tokens
    (expensive), plus a ragged tail: overlapping or shifted windows give a clearly different mean."""
    g = torch.Generator().manual_seed(4)
    parts = [torch.full((seqlen,), 5 + k) if k % 2 == 0 else torch.randint(0, 64, (seqlen,), generator=g)
             for k in range(windows)]
    return torch.cat([*parts, torch.randint(0, 64, (tail,), generator=g)])[None]


@pytest.mark.parametrize("whole_model", [True, False], ids=["whole-model", "layer-by-layer"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_is_exp_of_the_mean_window_loss(whole_model, batch_size):
    """exp of the mean over disjoint windows of the model's own loss (`labels=window`: transformers
    shifts the labels), the remainder after the last whole window ignored."""
    model = peaked_model()
    seqlen = 16
    ids = patterned_ids(seqlen, windows=5, tail=9)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids[0, :5 * seqlen].split(seqlen)]
    expected = math.exp(sum(losses) / len(losses))
    assert max(losses) > 2 * min(losses)  # the windows differ, so a wrong window set shows
    got = perplexity(model, eval_windows(ids, seqlen), CPU, batch_size, whole_model=whole_model)
    assert got == pytest.approx(expected, rel=1e-5)
