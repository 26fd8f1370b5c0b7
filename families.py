"""The model families the tool compresses: one declarative row each.

Everything family-specific is here: where a causal LM keeps its decoder layers, which modules make layer 0's
inputs and which turn the last layer's output into logits, and which Linears read the same input (and so
share one Hessian). Adding a family is a row (and tests), not a copy of the layer loop.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoder:
    """Where a causal-LM family keeps its decoder layers and what surrounds them."""

    model_types: tuple[str, ...]
    layers: str  # attribute path of the layer list from the CausalLM; a Linear's name is f"{layers}.{i}.{name}"
    before: tuple[str, ...]  # modules that make layer 0's inputs (absent ones are skipped)
    after: tuple[str, ...]  # modules from the last layer's output to the logits, in order
    shared_input: dict[str, str]  # Linear -> the Linear whose input (and so Hessian) it shares


FAMILIES = (
    Decoder(("opt",), "model.decoder.layers",
            ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
            ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
            {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj"}),
    Decoder(("llama", "mistral", "qwen2"), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
            ("model.norm", "lm_head"),
            {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
             "mlp.up_proj": "mlp.gate_proj"}),
)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.model_types)


def decoder_of(model_or_config) -> Decoder:
    """The family row of a model (or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    raise ValueError(f"unsupported model_type {config.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
