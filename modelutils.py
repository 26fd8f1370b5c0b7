"""Model plumbing: loading a causal LM of a supported family (families.py), finding its Linear layers, and the
walk over its decoder layers that compression, planning and evaluation share.

Layers are processed one at a time so the model itself can stay on the CPU; only the layer at
hand (and the activations of the calibration or evaluation windows, `LayerInputs`) live on the GPU.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from families import SUPPORTED_MODEL_TYPES, decoder_of
from systems import offload


def is_local_path(model: str) -> bool:
    """A model argument that names a directory rather than a hub id ("org/name")."""
    return os.path.isdir(model) or model.startswith((".", "/", "~")) or model.count("/") > 1


def model_source(model: str) -> str:
    """What from_pretrained should get: the expanded local directory, or the hub id as given."""
    if not is_local_path(model):
        return model
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        raise FileNotFoundError(f"{model} is a file, not a model directory: give the directory that holds its "
                                f"config.json (e.g. ../shared/models/opt-mini)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {model}")
    return path


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted attribute path, or None where the family leaves it out (OPT's project_in)."""
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


@dataclass
class LayerInputs:
    """Every window's input to the decoder layer at hand (`hidden`, updated in place as the walk goes on), the
    other arguments the decoder passes its layers (attention mask, positions, rotary tables: one row, which
    broadcasts over any batch), and how many windows go through a layer at once."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    batch_size: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return submodule(model, decoder_of(model).layers)


def home_of(layers: nn.ModuleList) -> torch.device:
    """Where the decoder layers live between uses: the CPU when offloaded, else the GPU."""
    return next(layers[0].parameters()).device


def resident(layers: nn.ModuleList, dev: torch.device) -> bool:
    """Whether the decoder layers stay on `dev` (not offloaded). Compares the device type: `dev` is
    often "cuda" where the layers report "cuda:0", and those two are not equal as torch.device."""
    return home_of(layers).type == dev.type


def walk_layers(model: nn.Module, dev: torch.device, inputs: LayerInputs | None = None,
                progress: Callable[[Any], Any] | None = None, check: bool = False,
                overlap: bool | offload.Streams | None = None, moves: offload.MoveStats | None = None):
    """The walk that compression, model-scope planning and layer-by-layer evaluation share: each decoder
    layer in turn is moved to `dev` and handed to the caller (`for i, layer in walk_layers(...)`); when the
    caller is done with it, `inputs.hidden` (every window's input to this layer) is run through the layer as
    the caller left it, in place, optionally checked for NaN/Inf, and the layer goes back where it lives.

    Offloaded layers on CUDA move behind the computation (offload.py: the next layer comes in and the
    previous one goes home while the caller works); `overlap` False moves them in line, a Streams object
    forces that mover whatever the devices (tests), None follows offload.OVERLAP. `moves` collects what
    the mover did. The results are the same either way.

    A streamed model (streaming.py: its layers are read from safetensors when needed) has a
    `layer_store`: each layer gets its host tensors from it before the move and gives them back after."""
    layers = decoder_layers(model)
    store = layer_store(model)
    home = torch.device("cpu") if store is not None else home_of(layers)
    items = enumerate(layers) if progress is None else progress(enumerate(layers))

    def after(i: int, layer: nn.Module) -> None:
        if inputs is not None:
            forward_layer(layer, inputs, inputs.hidden)
            if check:
                check_finite(inputs.hidden, f"output of decoder layer {i}")

    streams = offload.streams_for(home, dev, overlap)
    if streams is not None:
        yield from offload.overlapped_walk(layers, dev, streams, items, after, moves, store)
        return
    for i, layer in items:
        if store is not None:
            store.load(i, layer)
        layer.to(dev)
        yield i, layer
        after(i, layer)
        layer.to(home)
        if store is not None:
            store.unload(i, layer, True)


def layer_store(model: nn.Module) -> offload.LayerHome | None:
    """Where a streamed model's decoder layers are read from and written to (streaming.py), else None."""
    return getattr(model, "layer_store", None)


def linear_name(model: nn.Module, layer: int, name: str) -> str:
    """A decoder Linear's qualified name in the model (`model.decoder.layers.3.fc1` for OPT)."""
    return f"{decoder_of(model).layers}.{layer}.{name}"
_HUB_HOST = ("huggingface.co", 443)


class ModelError(ValueError):
    """A model the tool cannot use as given (wrong family, missing or broken files): one line naming it."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def hub_offline() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers at all (a TCP connection), so that an offline machine fails
    in seconds instead of after huggingface_hub's retries (about 30 s of "Retrying" lines)."""
    import socket

    if hub_offline():
        return False
    try:
        socket.create_connection(_HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


# Imported by transformers' generation only for assisted decoding's ROC curve, which no run here uses: scikit-learn
# (with SciPy) took a third of the transformers import on the 2-core machine, 1.1 s of 3.4 s.
UNUSED_OPTIONAL_IMPORTS = ("sklearn",)


def import_transformers(unused: tuple[str, ...] = UNUSED_OPTIONAL_IMPORTS) -> None:
    """Import the transformers classes a run uses. The auto classes pull in generation, torch.distributed and
    dynamo pieces: seconds, which the CLI spends while the GPU starts (opt_enhanced.device_starting); nothing
    imports transformers at module level. transformers asks whether each optional package is installed before
    importing it, so the packages in `unused` are hidden from it (import_hiding)."""
    if "transformers.models.auto.modeling_auto" in sys.modules:
        return  # imported already: nothing to hide, and another thread may be using it

    def auto_classes() -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import_hiding(unused, auto_classes)


def import_hiding(unused: tuple[str, ...], do_import: Callable[[], None]) -> None:
    """Call do_import while the packages in `unused` answer "not installed" (a None entry in sys.modules); they
    are importable again afterwards, for whatever needs them (lm-eval's metrics imports scikit-learn). Should the
    import need one after all (an ImportError), it is made again with nothing hidden."""
    hidden = [name for name in unused if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        do_import()
    except ImportError:
        for name in hidden:
            sys.modules.pop(name, None)
        hidden = []
        do_import()
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def load_config(model: str):
    """The model's config alone (no weights), checked to be a supported family. Raises ModelError with a
    one-line message: the hub cannot be reached, the id or directory holds no readable config, or the
    config is not OPT's."""
    from transformers import AutoConfig
    from transformers.utils import logging

    source = model_source(model)
    local = is_local_path(model)
    if not model.strip():
        raise ModelError("the model argument is empty: give a local model directory (e.g. ../shared/models/opt-mini) "
                         "or a hub id (facebook/opt-125m)")
    if local and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelError(f"{model} has no config.json: give a directory written by save_pretrained "
                         f"(e.g. ../shared/models/opt-mini)")
    if local:
        check_readable(source)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a config of another family draws warnings before our one-line refusal
    try:
        if local:
            config = AutoConfig.from_pretrained(source)
        else:
            try:  # the hub's local cache first: no network needed
                config = AutoConfig.from_pretrained(source, local_files_only=True)
            except OSError:
                if hub_offline():
                    raise ModelError(f"HF_HUB_OFFLINE is set and {model!r} is not in the local hub cache: pass a "
                                     f"local model directory (e.g. ../shared/models/opt-mini), or unset "
                                     f"HF_HUB_OFFLINE where the hub can be reached") from None
                if not hub_reachable():
                    raise ModelError(f"cannot reach the Hugging Face hub to fetch {model!r}: pass a local model "
                                     f"directory (e.g. ../shared/models/opt-mini) and --data_dir DIR with the "
                                     f"offline data") from None
                config = AutoConfig.from_pretrained(source)
    except ModelError:
        raise
    except Exception as e:  # unknown id, truncated or non-JSON config.json, unknown model_type, ...
        where = os.path.join(source, "config.json") if local else f"hub id {model!r}"
        raise ModelError(f"cannot read the model config from {where} ({first_line(e)}): give a local "
                         f"model directory (e.g. ../shared/models/opt-mini) or a reachable hub id") from e
    finally:
        logging.set_verbosity(verbosity)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{model} is a {kind!r} model; this tool compresses {', '.join(SUPPORTED_MODEL_TYPES)} "
                         f"models only (model_type in config.json)")
    return config


def check_readable(directory: str) -> None:
    """ModelError naming the first file of a model directory that this user cannot read (transformers would
    report an unreadable weights file as missing)."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            raise ModelError(f"cannot read {path} (permission denied): make the model's files readable "
                             f"(chmod a+r) or copy the model into a directory of yours")


def linear_names(config) -> list[list[str]]:
    """The Linear layers of each decoder layer by name, from the config alone (built on the meta device:
    no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return [list(find_linears(layer)) for layer in decoder_layers(skeleton)]


def linear_shapes(config) -> list[dict[str, tuple[int, int]]]:
    """(out_features, in_features) of each decoder layer's Linears by name, from the config alone (built on the meta
    device: no memory, no weights), for checks made before any work."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return [{n: (m.out_features, m.in_features) for n, m in find_linears(layer).items()}
            for layer in decoder_layers(skeleton)]


def is_packed_export(model: str) -> bool:
    """Whether `model` is a local directory holding our packed export (formats/packed.py) rather than a
    from_pretrained checkpoint."""
    return is_local_path(model) and os.path.isfile(os.path.join(os.path.expanduser(model), "packed.safetensors"))


def load_model(model: str, quiet: bool = False, check_values: bool = True) -> nn.Module:
    """The causal LM (a family of families.FAMILIES) from a local directory or the hub, in the checkpoint's dtype,
    eval mode: any from_pretrained directory (a compressed-tensors export too). Our packed export is loaded by
    formats.packed.load_compressed (pipeline.placement chooses).

    Refused with ModelError (one line naming the model): a config of another family, weights missing
    from the checkpoint (transformers would initialise them at random), unexpected or mis-shaped
    ones, files that cannot be read; with FloatingPointError: a NaN/Inf weight, named by tensor. `check_values`
    False leaves that scan to the caller (`check_weights_finite`), to run where the weights are placed: on the
    CPU it is a pass over every weight (about 3 s for OPT-1.3B on two cores), on the GPU milliseconds."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    if quiet:
        logging.disable_progress_bar()
    load_config(model)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report is replaced by our own message below
    try:
        # mis-shaped tensors are loaded aside and listed in `info`, so that the message below names them (raising,
        # transformers points at a report that the verbosity above silences)
        net, info = AutoModelForCausalLM.from_pretrained(model_source(model), dtype="auto", output_loading_info=True,
                                                         ignore_mismatched_sizes=True)
    except Exception as e:
        raise ModelError(f"cannot load the weights of {model} ({first_line(e)}): the checkpoint files are "
                         f"missing or damaged; write them again with save_pretrained") from e
    finally:
        logging.set_verbosity(verbosity)
    names = lambda key: [k if isinstance(k, str) else str(k[0]) for k in info.get(key) or ()]
    check_checkpoint(model, names("missing_keys"), names("unexpected_keys"), names("mismatched_keys"),
                     net.state_dict() if check_values else {})
    # config.use_cache stays the source's, so that --save and --export write it as it was: every forward of a run
    # passes use_cache=False itself (and lm_eval_tasks.evaluate turns the cache off while lm-eval scores)
    return net.eval()


def check_checkpoint(model: str, missing: list[str], unexpected: list[str], misshaped: list[str],
                     tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose tensors do not match its config (ModelError, naming up to three of each kind)
    or hold NaN/Inf (FloatingPointError, naming the tensor): run on, it would compress random or broken weights."""
    problems = [(what, sorted(keys)) for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        detail = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                           for what, keys in problems)
        raise ModelError(f"the checkpoint in {model} does not match its config.json: {detail}; refusing to run on "
                         f"randomly initialised weights")
    check_weights_finite(model, tensors)


def check_weights_finite(model: str, tensors: dict[str, torch.Tensor]) -> None:
    """FloatingPointError naming the first tensor of the checkpoint in `model` that holds NaN/Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"NaN/Inf in {name} of the checkpoint in {model}: the model file is damaged")


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """All nn.Linear submodules by qualified name (the weights the solver compresses)."""
    return {
        f"{prefix}.{name}" if prefix else name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }


def decoder_io_modules(model: nn.Module) -> list[nn.Module]:
    """The modules outside the decoder layers that produce layer-0 inputs or consume the last output."""
    inputs = [submodule(model, path) for path in decoder_of(model).before]
    return [m for m in inputs if m is not None] + head_modules(model)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int) -> LayerInputs:
    """Hidden states entering decoder layer 0 for every window, plus the keyword arguments the
    decoder passes to its layers (attention mask, positions, ...), whatever this transformers
    version computes. The windows all have one length, so one set of kwargs serves every batch."""
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    hidden = torch.zeros(ids.shape[0], ids.shape[1], model.config.hidden_size, dtype=dtype, device=device)
    kwargs: dict[str, Any] = {}
    first = layers[0]

    def catch(_module, args, kw):
        x = args[0] if args else kw["hidden_states"]
        hidden[catch.at:catch.at + x.shape[0]] = x
        kwargs.clear()
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            catch.at = start
            try:
                model(ids[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return LayerInputs(hidden, _batch_free(kwargs), batch_size)


def _batch_free(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Attention masks and rotary (cos, sin) are per batch; keep one row so they broadcast over any batch size."""
    def one_row(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(one_row(x) for x in v)
        return v

    return {k: one_row(v) for k, v in kwargs.items()}


@torch.no_grad()
def forward_layer(layer: nn.Module, inputs: LayerInputs, out: torch.Tensor | None = None) -> None:
    """Run one decoder layer over all windows in batches, writing into `out` (may be `inputs.hidden`
    itself: each batch is read before its slice is overwritten) or, if None, only for the hooks."""
    hidden, step = inputs.hidden, inputs.batch_size
    for start in range(0, hidden.shape[0], step):
        y = layer(hidden[start:start + step], **inputs.kwargs)
        if out is not None:
            out[start:start + step] = layer_output(y)


def layer_output(y: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states, alone or first in a tuple, by transformers version."""
    return y[0] if isinstance(y, tuple) else y


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules between the last decoder layer's output and the logits."""
    modules = [submodule(model, path) for path in decoder_of(model).after]
    return [m for m in modules if m is not None]


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The vocabulary logits of the last decoder layer's output."""
    for m in head_modules(model):
        hidden = m(hidden)
    return hidden


class _InputsSeen(Exception):
    """Raised by `feed_inputs`' hook once a batch has reached every module it feeds."""


def feed_inputs(layer: nn.Module, modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None],
                inputs: LayerInputs, out: torch.Tensor | None = None) -> None:
    """Run every window through `layer` in batches, passing each of `modules`' inputs to sink(name, x), and
    stop each batch's forward once every module has had all the inputs it gets per batch.

    Why stop: the layer's output is not wanted here (the Hessians are made from the uncompressed layer's
    inputs, and the layer is run again once compressed), and the work after the last module's input is
    not needed: in a decoder layer, the last Linear's own product (fc2: 2 of 12 GEMMs at OPT width) and
    the residual. The first batch runs whole and counts each module's calls, so a module called twice
    per forward is never cut short.

    With `out` every batch runs whole and its output goes into `out`, as `forward_layer` writes it (it may be
    `inputs.hidden`): for a walk that leaves the layer as it is (the model-scope plan), one forward gives both."""
    calls: dict[str, int] = dict.fromkeys(modules, 0)
    expected: dict[str, int] | None = None

    def hook(name: str):
        def pre(_module: nn.Module, inp: tuple) -> None:
            sink(name, inp[0].data)
            calls[name] += 1
            if out is None and expected is not None and calls == expected:
                raise _InputsSeen
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    hidden, step = inputs.hidden, inputs.batch_size
    try:
        for start in range(0, hidden.shape[0], step):
            try:
                y = layer(hidden[start:start + step], **inputs.kwargs)
                if out is not None:
                    out[start:start + step] = layer_output(y)
            except _InputsSeen:
                pass
            if expected is None:
                expected = dict(calls)
            calls.update(dict.fromkeys(modules, 0))
    finally:
        for h in handles:
            h.remove()


def check_finite(x: torch.Tensor, what: str) -> None:
    """Stop at the first NaN/Inf with the name of the layer that produced it."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"NaN/Inf in {what}")
