"""A whole decode step of a random-weight OPT (transformers' OPTForCausalLM with a static KV cache), captured as a
CUDA graph and timed: what a served model's step costs with fp16 Linears or QuantLinears.
"""
from __future__ import annotations

import time
from typing import Any

import torch


def build_opt(layers: int, hidden: int, device: str) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                    num_attention_heads=hidden // 128 if hidden >= 128 else 4, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                    dropout=0.0, do_layer_norm_before=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(cfg).to(torch.float16).eval()
    return model


def decoder_linears(decoder: torch.nn.Module) -> list[str]:
    return [n for n, mod in decoder.named_modules()
            if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "QuantLinear"]


def set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def time_decode_step(model: torch.nn.Module, batch: int, cache_len: int, position: int, reps: int,
                     device: str) -> dict[str, Any]:
    """One decode step of the decoder (embeddings, layers, final norm; no lm_head) at `position` of a static
    cache of `cache_len`, captured as a CUDA graph and replayed. The 4-D attention mask and explicit positions
    keep the step free of host synchronisation (transformers' own mask and position code read tensors)."""
    from transformers import StaticCache

    decoder = model.model.decoder
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), position, device=device)
    mask = torch.zeros(batch, 1, 1, cache_len, dtype=torch.bool, device=device)
    mask[..., :position + 1] = True

    def step():
        return decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)

    def rewind():
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.fill_(position)

    with torch.no_grad():
        for _ in range(2):  # eager: initialises the cache, tunes anything untuned
            rewind()
            step()
        if device != "cuda":
            start = time.perf_counter()
            rewind()
            step()
            return {"us": (time.perf_counter() - start) * 1e6, "graph": False}
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            rewind()
            step()
        torch.cuda.current_stream().wait_stream(stream)
        rewind()
        with torch.cuda.graph(graph):
            step()
        times = []
        for _ in range(reps):
            rewind()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        del graph
    times.sort()
    return {"us": times[len(times) // 2], "graph": True}
