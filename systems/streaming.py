"""Decoder layers read from safetensors when a walk reaches them, for models larger than host memory (--stream).

`load_streamed` builds the model without its decoder layers' weights (parameters on the meta device)
and loads the rest (embeddings, final norm, head). Its `layer_store` gives each decoder layer its
tensors from the checkpoint's shards when modelutils.walk_layers reaches it (only that layer's keys,
through safetensors.safe_open) and takes them back afterwards, so host memory holds the non-layer
tensors and a few layers (with the overlapped walk of offload.py: the one being sent home, the next
one, and two staging buffers) instead of the whole model: OPT-175B is 350 GB in fp16.

While the store is `writing` (run() turns it on around compression), each layer it takes back is
written to its own safetensors file in a scratch directory, and from then on read from there: the
compressed layers are what evaluation and --save see. `save_streamed` links (or copies) those files
into the checkpoint directory it writes, with the non-layer tensors, an index and the config, so
from_pretrained loads it. The scratch directory sits beside the --save target (same file system,
so linking is free) or in the system's temporary directory, and goes when the store does, or when a failed
or interrupted run leaves (`remove_scratch`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from modelutils import ModelError, check_checkpoint, decoder_layers, decoder_of, layer_store, load_config, model_source

INDEX = "model.safetensors.index.json"
REST = "model-rest.safetensors"  # the non-layer tensors in a streamed --save
METADATA = {"format": "pt"}  # what transformers expects in a safetensors header


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def checkpoint_keys(directory: str) -> dict[str, str]:
    """Every tensor key of a safetensors checkpoint directory and the file that holds it."""
    from safetensors import safe_open

    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(directory, name) for key, name in weight_map.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    keys = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            keys.update({key: os.path.join(directory, name) for key in f.keys()})
    return keys


def read_tensors(where: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """{name: tensor} for `where` = {name: (file, key)}, each file opened once."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, (path, key) in where.items():
        by_file[path].append((name, key))
    tensors = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name, key in names:
                tensors[name] = f.get_tensor(key)
    return tensors


def empty_layer(layer: nn.Module) -> None:
    """Give the layer's parameters back (meta tensors of the same shapes), so their host memory is freed.
    Buffers stay: the non-persistent ones (not in the checkpoint) could not be read back."""
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None and p.device.type != "meta":
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                        requires_grad=p.requires_grad)


class LayerStore:
    """Where each decoder layer's tensors are read from: the checkpoint's files, or once a writing walk
    has given the layer back, its own file in the scratch directory (offload.LayerHome)."""

    def __init__(self, prefix: str, sources: list[dict[str, tuple[str, str]]], scratch_parent: str | None = None):
        self.prefix = prefix  # the layer list's key prefix: f"{prefix}{i}.{name}" is a layer tensor's key
        self.sources = sources  # per layer: {name in the layer: (file, key)}
        self.scratch_parent = scratch_parent
        self.scratch: str | None = None
        self.written: set[int] = set()
        self.writing = False

    def load(self, index: int, layer: nn.Module) -> None:
        layer.load_state_dict(read_tensors(self.sources[index]), strict=True, assign=True)

    def unload(self, index: int, layer: nn.Module, visited: bool) -> None:
        if visited and self.writing:
            self.write(index, layer.state_dict())
        empty_layer(layer)

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a layer's tensors in the scratch directory; later loads read them from there."""
        from safetensors.torch import save_file

        path = os.path.join(self._scratch(), layer_file(index))
        keys = {name: f"{self.prefix}{index}.{name}" for name in tensors}
        # A new file renamed over the old: tensors read from the old one map its pages (safe_open reads lazily),
        # and rewriting it in place would pull those pages from under them.
        save_file({keys[n]: t.detach().contiguous() for n, t in tensors.items()}, path + ".new", metadata=METADATA)
        os.replace(path + ".new", path)
        self.sources[index] = {name: (path, keys[name]) for name in tensors}
        self.written.add(index)

    def _scratch(self) -> str:
        if self.scratch is None:
            self.scratch = tempfile.mkdtemp(prefix=".stream-", dir=self.scratch_parent)
            SCRATCH.add(self.scratch)
            weakref.finalize(self, _remove, self.scratch)
        return self.scratch


# Every scratch directory this process made and has not removed yet (`remove_scratch`).
SCRATCH: set[str] = set()


def _remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    SCRATCH.discard(directory)


def remove_scratch() -> None:
    """Remove every scratch directory of this process's streamed models now, whatever holds them. A run that
    fails or is interrupted calls this on its way out: the store's own finalizer runs only when the model is
    collected, and the CLI ends its process with os._exit, which collects nothing (the traceback it reported
    still holds the model), so the compressed layers' files stayed beside --save or in $TMPDIR."""
    for directory in sorted(SCRATCH):
        _remove(directory)


@contextmanager
def writing(model: nn.Module) -> Iterator[None]:
    """Layers a walk gives back while this block runs are kept (written); nothing for a model not streamed."""
    store = layer_store(model)
    if store is None:
        yield
        return
    store.writing = True
    try:
        yield
    finally:
        store.writing = False


def load_streamed(model: str, scratch_parent: str | None = None) -> nn.Module:
    """The causal LM of a local safetensors checkpoint (one file or shards with an index) with its decoder
    layers' parameters on the meta device and a LayerStore to read them from, in eval mode.

    ModelError (one line) for what cannot be streamed or does not match the config: not a local
    safetensors directory, tensors missing, unexpected or mis-shaped; FloatingPointError for a
    NaN/Inf non-layer tensor (layer weights are checked as compression reaches them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    source = model_source(model)
    if not os.path.isdir(source):
        raise ModelError(f"--stream reads a local checkpoint directory; {model} is not one (download it first)")
    if os.path.isfile(os.path.join(source, "packed.safetensors")):
        raise ModelError(f"{model} is a packed export; --stream reads from_pretrained checkpoints")
    keys = checkpoint_keys(source)
    if not keys:
        raise ModelError(f"{model} has no safetensors files; --stream reads safetensors (save_pretrained writes them)")
    with init_empty_weights(include_buffers=False):
        net = AutoModelForCausalLM.from_config(config, dtype=_dtype_of(keys))
    expected = net.state_dict()
    prefix = decoder_of(net).layers + "."
    sources: list[dict[str, tuple[str, str]]] = [{} for _ in decoder_layers(net)]
    rest: dict[str, tuple[str, str]] = {}
    unexpected = []
    for key, path in keys.items():
        name = key if key in expected else f"{net.base_model_prefix}.{key}"  # hub OPT checkpoints lack "model."
        if name not in expected:
            unexpected.append(key)
        elif name.startswith(prefix):
            index, _, local = name[len(prefix):].partition(".")
            sources[int(index)][local] = (path, key)
        else:
            rest[name] = (path, key)
    tensors = read_tensors(rest)
    net.load_state_dict(tensors, strict=False, assign=True)
    net.tie_weights()
    missing = [n for n, p in net.named_parameters() if p.device.type == "meta" and not n.startswith(prefix)]
    for i, (layer, found) in enumerate(zip(decoder_layers(net), sources)):
        missing += [f"{prefix}{i}.{n}" for n in layer.state_dict() if n not in found]
    misshaped = [n for n, t in tensors.items() if t.shape != expected[n].shape]
    check_checkpoint(model, missing, unexpected, misshaped, tensors)
    net.layer_store = LayerStore(prefix, sources, scratch_parent)
    return net.eval()  # config.use_cache as the source has it (modelutils.load_opt says why)


def _dtype_of(keys: dict[str, str]) -> torch.dtype:
    """The checkpoint's floating-point dtype (that of its first floating tensor), as from_pretrained's "auto"."""
    from safetensors import safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    for key, path in keys.items():
        with safe_open(path, framework="pt") as f:
            found = names.get(f.get_slice(key).get_dtype())
        if found is not None:
            return found
    return torch.float32


def save_streamed(model: nn.Module, directory: str) -> None:
    """A from_pretrained checkpoint of a streamed model in `directory` (existing, empty): one file per
    decoder layer (the scratch directory's, linked where the file system allows, else copied; a layer
    never written is read and written again), the non-layer tensors, the index and the config."""
    from safetensors.torch import save_file

    store: LayerStore = layer_store(model)
    weight_map: dict[str, str] = {}
    total = 0
    rest, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if name.startswith(store.prefix) or tensor.untyped_storage().data_ptr() in seen:
            continue  # layers are saved below; a tied weight (the head) once, as its embedding
        seen.add(tensor.untyped_storage().data_ptr())
        rest[name] = tensor.detach().to("cpu").contiguous()
    save_file(rest, os.path.join(directory, REST), metadata=METADATA)
    weight_map.update({name: REST for name in rest})
    total += sum(t.numel() * t.element_size() for t in rest.values())
    for i in range(len(store.sources)):
        dest = os.path.join(directory, layer_file(i))
        if i in store.written:
            path = next(iter(store.sources[i].values()))[0]
            try:
                os.link(path, dest)
            except OSError:  # another file system
                shutil.copyfile(path, dest)
            keys = {key for _, key in store.sources[i].values()}
        else:
            tensors = read_tensors(store.sources[i])
            keys = {f"{store.prefix}{i}.{n}" for n in tensors}
            save_file({f"{store.prefix}{i}.{n}": t.contiguous() for n, t in tensors.items()}, dest, metadata=METADATA)
        weight_map.update({key: layer_file(i) for key in keys})
        total += os.path.getsize(dest)
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
