"""Moving offloaded decoder layers to the GPU and back behind the computation.

With --offload every decoder layer lives in host memory and visits the GPU once per walk. Moved in
line, a layer at OPT-175B width spends 2.8 s of its 12.7 s in transit (H200, bench.py --stages:
0.5 s in, 2.3 s back). Here a worker thread moves layers on a side CUDA stream while the caller's
stream computes: layer i+1 comes in and layer i-1 goes home while layer i is compressed.

Why a worker thread and pinned staging buffers rather than pinning the model: the GPU only copies
asynchronously from page-locked memory, and pinning every layer once would lock the whole model
(350 GB for OPT-175B) in host RAM, while `Tensor.pin_memory()` copies (doubling a layer) and rounds
each tensor up to a power of two. Instead each direction has one reusable pinned buffer the size
of a layer; the worker copies a layer's host tensors into it (CPU memcpy) and the GPU reads it
asynchronously, and the way back is the same in reverse. Host memory is the model plus two layers;
GPU memory at most two layers (the one being worked on and the next) plus the working set, because
the worker sends layer i-1 home before it brings layer i+1 in (one worker, first in first out).

Ordering between the two streams is by events: the caller's stream waits for a layer's arrival
before using it; the side stream waits for the caller's stream to finish with a layer before
copying it back; a tensor made on the side stream and used on the caller's is marked
(`record_stream`) so its memory is not reused while the caller's stream may still read it; the
GPU tensors a layer leaves with are held until their copy home has landed. The copies are exact,
so the weights and every result are bit-identical to moving layers in line.

All CUDA calls go through a `Streams` object so that the same bookkeeping runs on the CPU in the
tests (`HostStreams`: no streams, every event already complete).
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

# Whether walks of offloaded layers on CUDA overlap their moves (True), move in line (False), or use
# these Streams whatever the devices (tests); a run passes --no-overlap to walk_layers instead.
OVERLAP: bool | "Streams" = True

ALIGN = 256  # byte alignment of each tensor in a staging buffer (any dtype can be viewed there)


class Streams:
    """The CUDA stream and event calls the mover makes."""

    pin = True  # staging buffers in page-locked memory, so that copies from and to them are asynchronous

    def side(self, dev: torch.device) -> Any:
        return torch.cuda.Stream(dev)

    def current(self, dev: torch.device) -> Any:
        return torch.cuda.current_stream(dev)

    def using(self, stream: Any) -> ContextManager:
        """Work issued inside goes to `stream` (per thread)."""
        return torch.cuda.stream(stream)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        """`stream`'s later work starts after `event` (the host does not wait)."""
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        """The host waits for `event`."""
        event.synchronize()

    def used_on(self, tensor: torch.Tensor, stream: Any) -> None:
        """`tensor` (made on another stream) is used on `stream`: its memory waits for that use when freed."""
        tensor.record_stream(stream)


class HostStreams(Streams):
    """No streams: work happens when it is issued, so every event is complete. For the CPU."""

    pin = False

    def side(self, dev: torch.device) -> Any:
        return None

    def current(self, dev: torch.device) -> Any:
        return None

    def using(self, stream: Any) -> ContextManager:
        return contextlib.nullcontext()

    def record(self, stream: Any) -> Any:
        return None

    def wait(self, stream: Any, event: Any) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        pass

    def used_on(self, tensor: torch.Tensor, stream: Any) -> None:
        pass


def streams_for(home: torch.device, dev: torch.device, overlap: bool | Streams | None = None) -> Streams | None:
    """The Streams a walk from `home` to `dev` moves layers with, or None to move them in line.
    `overlap` None means the module's OVERLAP. Overlap needs CUDA and layers that live elsewhere."""
    choice = OVERLAP if overlap is None else overlap
    if isinstance(choice, Streams):
        return choice
    if choice and dev.type == "cuda" and home.type != dev.type:
        return Streams()
    return None


class LayerHome(Protocol):
    """Where decoder layers live between visits when the model does not hold them (streaming.py reads
    them from safetensors): the walk asks for a layer's host tensors before moving it and hands them
    back after."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Give `layer` its host tensors (it holds none, e.g. meta ones, before)."""

    def unload(self, index: int, layer: nn.Module, visited: bool) -> None:
        """Take the layer's host tensors back, keeping what a walk that `visited` it (handed it to its
        caller) may have changed."""


@dataclass
class Slot:
    """One tensor of a layer (a parameter or a buffer of one of its modules) and its host copy."""

    module: nn.Module
    name: str
    is_param: bool
    home: torch.Tensor

    def get(self) -> torch.Tensor:
        if self.is_param:
            return self.module._parameters[self.name].data
        return self.module._buffers[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor  # the Parameter object (and any hook on it) stays
        else:
            self.module._buffers[self.name] = tensor


def slots_of(layer: nn.Module) -> list[Slot]:
    """Every parameter (each shared one once) and buffer of a layer, where it sits now."""
    seen: set[int] = set()
    slots = []
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                slots.append(Slot(module, name, True, p.data))
        for name, b in module._buffers.items():
            if b is not None:
                slots.append(Slot(module, name, False, b))
    return slots


class Staging:
    """A reusable host buffer that a layer's tensors are packed into, one aligned view each."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the buffer with the shapes and dtypes of `tensors`, none overlapping another; the
        buffer grows when they do not fit (the caller makes sure the old one is no longer read)."""
        offsets, end = [], 0
        for t in tensors:
            offsets.append(end)
            end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        if end > self.buffer.numel():
            self.buffer = torch.empty(0, dtype=torch.uint8)  # the old buffer goes before the new one comes
            self.buffer = torch.empty(end, dtype=torch.uint8, pin_memory=self.pin)
        return [self.buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for o, t in zip(offsets, tensors)]


@dataclass
class Visit:
    """One layer's trip: its slots, the worker's fetch (device tensors, arrival event) until it arrives,
    and the worker's copy home once it leaves."""

    index: int
    layer: nn.Module
    slots: list[Slot] = field(default_factory=list)  # filled by the worker: a streamed layer has none before
    arriving: Future | None = None
    leaving: Future | None = None


@dataclass
class MoveStats:
    """What a mover did, in order, for tests and benchmarks."""

    on_device: int = 0  # layers whose device copies exist now
    peak_on_device: int = 0
    log: list[tuple[str, int]] = field(default_factory=list)  # (what happened, to which layer)
    times: list[float] = field(default_factory=list)  # time.perf_counter() of each entry of `log`

    def note(self, event: str, index: int) -> None:
        self.log.append((event, index))
        self.times.append(time.perf_counter())


class LayerMover:
    """Brings layers to `dev` and sends them home on one worker thread and a side stream; the caller's
    stream (current when the mover is made) is the one that computes. The worker runs its jobs in the
    order they are given, so a layer sent home before the next is fetched leaves the device first."""

    def __init__(self, dev: torch.device, streams: Streams, stats: MoveStats | None = None,
                 home: LayerHome | None = None) -> None:
        self.dev = dev
        self.home = home
        self.streams = streams
        self.compute = streams.current(dev)
        self.side = streams.side(dev)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-mover")
        self.inbound = Staging(streams.pin)
        self.outbound = Staging(streams.pin)
        self.inbound_read: Any = None  # event: the GPU has read the inbound buffer's last contents
        self.stats = stats if stats is not None else MoveStats()

    # ---- main thread

    def fetch(self, index: int, layer: nn.Module) -> Visit:
        """Start bringing `layer` to the device; it stays at home until `arrive`."""
        visit = Visit(index, layer)
        self.stats.note("fetch", index)
        visit.arriving = self.worker.submit(self._bring, visit)
        return visit

    def arrive(self, visit: Visit) -> None:
        """Wait for the layer's device tensors and point the layer at them; the caller's stream waits for
        their copy before any later work."""
        try:
            moved, ready = visit.arriving.result()
        except torch.OutOfMemoryError:
            # No room for the next layer beside the last one: fetch it again, after the last one has left
            # (the worker sends it home first). Later layers are still fetched ahead.
            self.stats.note("refetch", visit.index)
            visit.arriving = self.worker.submit(self._bring, visit)
            moved, ready = visit.arriving.result()
        visit.arriving = None  # from here on the layer holds the device tensors, nothing else
        self.streams.wait(self.compute, ready)
        for slot, tensor in zip(visit.slots, moved):
            self.streams.used_on(tensor, self.compute)
            slot.set(tensor)
        self.stats.note("arrive", visit.index)

    def depart(self, visit: Visit) -> None:
        """Send the layer home as the caller left it: it points at its host tensors again at once, and
        their contents are the device's once `visit.leaving` is done (`close` waits for that)."""
        current = [slot.get() for slot in visit.slots]
        for slot, tensor in zip(visit.slots, current):
            if tensor.shape != slot.home.shape or tensor.dtype != slot.home.dtype:  # the caller replaced it so
                slot.home = torch.empty(tensor.shape, dtype=tensor.dtype, device=slot.home.device)
        done = self.streams.record(self.compute)
        for slot in visit.slots:
            slot.set(slot.home)
        self.stats.note("depart", visit.index)
        visit.leaving = self.worker.submit(self._send, visit, current, done)

    def abandon(self, visit: Visit) -> None:
        """A fetched layer that will not arrive (the walk stopped early): drop its device tensors."""
        self.worker.submit(self._drop, visit, visit.arriving)
        visit.arriving = None

    def close(self) -> None:
        """Wait for every move to complete and stop the worker."""
        self.worker.shutdown(wait=True)

    # ---- worker thread

    @torch.no_grad()
    def _bring(self, visit: Visit) -> tuple[list[torch.Tensor], Any]:
        if self.home is not None:
            self.home.load(visit.index, visit.layer)
        visit.slots = slots_of(visit.layer)
        homes = [slot.home for slot in visit.slots]
        if self.inbound_read is not None:
            self.streams.synchronize(self.inbound_read)  # the previous layer's bytes have left the buffer
        staged = self.inbound.views(homes)
        self.outbound.views(homes)  # sized now, on the first layer: pinning gigabytes stalls the GPU's work for seconds
        for view, home in zip(staged, homes):
            view.copy_(home)
        self.stats.note("staged", visit.index)
        with self.streams.using(self.side):
            moved = [torch.empty_like(view, device=self.dev).copy_(view, non_blocking=True) for view in staged]
            self.inbound_read = ready = self.streams.record(self.side)
        self._count(+1)
        self.stats.note("brought", visit.index)
        return moved, ready

    @torch.no_grad()
    def _send(self, visit: Visit, current: list[torch.Tensor], done: Any) -> None:
        self.streams.wait(self.side, done)  # the caller's stream has finished with the layer
        with self.streams.using(self.side):
            staged = self.outbound.views(current)
            for view, tensor in zip(staged, current):
                view.copy_(tensor, non_blocking=True)
            landed = self.streams.record(self.side)
        self.streams.synchronize(landed)
        self.stats.note("landed", visit.index)
        for slot, view in zip(visit.slots, staged):
            slot.home.copy_(view)
        current.clear()  # the device tensors are freed here, after their last reader
        self._count(-1)
        if self.home is not None:
            self.home.unload(visit.index, visit.layer, True)
        self.stats.note("sent", visit.index)

    def _drop(self, visit: Visit, arriving: Future) -> None:
        try:
            moved, _ = arriving.result()
        except Exception:  # the fetch itself failed: nothing was made
            return
        moved.clear()
        self._count(-1)
        if self.home is not None:
            self.home.unload(visit.index, visit.layer, False)

    def _count(self, change: int) -> None:
        self.stats.on_device += change
        self.stats.peak_on_device = max(self.stats.peak_on_device, self.stats.on_device)


def overlapped_walk(layers: nn.ModuleList, dev: torch.device, streams: Streams,
                    items: Iterable[tuple[int, nn.Module]], after: Callable[[int, nn.Module], None],
                    stats: MoveStats | None = None, home: LayerHome | None = None
                    ) -> Iterator[tuple[int, nn.Module]]:
    """modelutils.walk_layers with the moves behind the computation: each layer is handed to the caller
    on `dev`, then `after(i, layer)` (the forward that feeds the next layer) runs before it goes home.
    Layer i+1 is fetched before layer i is handed over. When the walk ends, normally or not, every
    layer is at home with the contents the caller left it with (given back to `home` if there is one)."""
    mover = LayerMover(dev, streams, stats, home)
    visit: Visit | None = None  # the layer being worked on, on the device
    upcoming: Visit | None = None  # the next one, being fetched
    sends: list[Future] = []
    finished = False
    try:
        for i, layer in items:
            visit = upcoming if upcoming is not None else mover.fetch(i, layer)
            upcoming = None
            mover.arrive(visit)
            if i + 1 < len(layers):
                upcoming = mover.fetch(i + 1, layers[i + 1])
            yield i, layer
            after(i, layer)
            mover.depart(visit)
            sends.append(visit.leaving)
            visit = None
            while sends and sends[0].done():
                sends.pop(0).result()  # an error sending a layer home surfaces at the next layer
        finished = True
    finally:
        try:
            if visit is not None and visit.arriving is not None:  # stopped while waiting for it
                mover.abandon(visit)
            elif visit is not None:  # the caller or the forward failed: the layer goes home as it is
                mover.depart(visit)
                sends.append(visit.leaving)
            if upcoming is not None:
                mover.abandon(upcoming)
        except Exception:
            if finished:
                raise
        finally:
            mover.close()
        if finished:
            for sent in sends:
                sent.result()
