"""LLaMA-family models (Llama, Mistral, Qwen2) through the same loop as OPT: one row of modelutils.FAMILIES."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

import opt_enhanced as oe
from mixed.stats import summarize
from modelutils import decoder_layers, find_linears, linear_name
from pipeline.checks import validate
from pipeline.compress import compress
from pipeline.config import RunConfig
from pipeline.evaluate import eval_windows, perplexity
from pipeline.run import run
from systems.progress import Log

FAMILIES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}


def tiny(kind: str, vocab: int = 64) -> torch.nn.Module:
    """Two layers, grouped-query attention (4 query heads, 2 key/value heads), random weights large enough that
    each layer changes the residual stream."""
    torch.manual_seed(0)
    config = FAMILIES[kind](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                            tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in decoder_layers(model):
            for linear in find_linears(layer).values():
                linear.weight.mul_(4)
    return model


def compressed(model, **flags):
    cfg = RunConfig(model="tiny", dataset="c4", nsamples=4, blocksize=32, **flags)
    validate(cfg)
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    return compress(model, calib, cfg, torch.device("cpu"), Log(True))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_layer_by_layer_evaluation_is_the_models_own_loss(kind):
    model = tiny(kind)
    ids = torch.randint(0, 64, (1, 5 * 32), generator=torch.Generator().manual_seed(2))
    windows = ids.view(5, 32)
    with torch.no_grad():
        own = math.exp(sum(model(w[None], labels=w[None]).loss.item() for w in windows) / 5)
    for whole in (True, False):  # batches of 3 and 2: the layer inputs' keyword arguments must fit both
        ours = perplexity(model, eval_windows(ids, 32), torch.device("cpu"), 3, whole_model=whole)
        assert ours == pytest.approx(own, rel=1e-4), whole


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_sparsity_and_quantization_are_exact_on_every_linear(kind):
    model = tiny(kind)
    done = compressed(model, sparsity=0.5, wbits=4)
    names = {s.name for s in done.stats}
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down
    assert linear_name(model, 1, "mlp.down_proj") in names
    for s in done.stats:
        W = model.get_submodule(s.name).weight
        assert s.kept == W.numel() // 2  # exactly half of every block of 32 columns (blocks divide the rows' length)
        scale, zero, maxq = done.grids[s.name].column_params(0, W.shape[1], done.bits[s.name])
        code = W.float() / scale + zero
        assert torch.allclose(code, code.round(), atol=1e-3) and code.min() >= -1e-3 and code.max() <= 15 + 1e-3


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_mixed_precision_meets_the_stored_target_and_ties_shared_inputs(kind):
    model = tiny(kind)
    done = compressed(model, sparsity=0.5, wbits=4, target_avg_bits=3.5, bit_method="budget")
    assert abs(summarize(done.stats).stored_bits - 3.5) <= 0.02
    per_linear = tiny(kind)
    done = compressed(per_linear, sparsity=0.5, wbits=4, target_avg_bits=3.5, bit_method="budget", bit_scope="model",
                    bit_granularity="linear")
    width = {s.name: set(s.bits_per_column) for s in done.stats}
    for i in range(2):
        name = lambda n: linear_name(per_linear, i, n)
        assert width[name("self_attn.q_proj")] == width[name("self_attn.k_proj")] == width[name("self_attn.v_proj")]
        assert width[name("mlp.gate_proj")] == width[name("mlp.up_proj")]


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_cli_save_and_reload_reproduce_the_perplexity(kind, tmp_path, tiny_dir):
    model = tiny(kind, vocab=260)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_dir[0]).save_pretrained(tmp_path / "model")  # the byte-level BPE, serialized
    common = ["c4", "--data_dir", str(tiny_dir[1]), "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
              "--eval", "ptb", "--quiet"]
    first = run(oe.parse_args([str(tmp_path / "model"), *common, "--sparsity", "0.5", "--wbits", "4",
                                "--save", str(tmp_path / "saved")]))
    again = run(oe.parse_args([str(tmp_path / "saved"), *common]))
    assert again["perplexity"] == first["perplexity"]
