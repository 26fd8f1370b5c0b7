"""Several processes of one host, one GPU each, through torch.distributed.

    torchrun --standalone --nproc_per_node 2 opt_enhanced.py MODEL DATASET [flags]
    python opt_enhanced.py MODEL DATASET --gpus 2 [flags]        (launches the line above)

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `session` then joins the processes (NCCL on CUDA, each
rank on cuda:LOCAL_RANK; gloo on the CPU, which is how the tests run it). A process started without
torchrun initialises nothing, and every function here is then the identity or does nothing, so a
one-process run is exactly what it was before this module existed.

How the work is split, and why the result is one process's up to the order of sums:
- the calibration and evaluation windows: each rank takes a contiguous shard (`shard`) and runs it
  through the layers; X^T X, the token counts and the activation peaks of each Linear's input, and the
  NLL sums, are added (maxed) across ranks (`reduce_hessians`, `total`), so every rank holds the
  Hessian one process would have;
- the Linears of a layer: Linears that read one input (q/k/v) share one Hessian and one inverse
  factor, so such a group goes whole to one rank; groups go to the least-loaded rank, largest first,
  by a flop estimate (`assign`). Each rank solves its own, then every compressed weight goes from its
  owner to all ranks (the next layer's inputs need it) with its statistics, grid and bit map (the
  summary and --export need those on rank 0) (`share_linears`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


class PeerLost(RuntimeError):
    """A collective failed: another process ended (its own message says why) or cannot be reached."""


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Name a failed collective in one line: gloo raises a RuntimeError quoting its source file when a
    peer's connection closes, NCCL a DistBackendError (a RuntimeError too) at its timeout."""
    try:
        yield
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise PeerLost(f"{what}: another process failed or was stopped (see its message) ({detail})") from e


def launched_size() -> int:
    """How many processes the launcher started (1 without torchrun), known before `session` joins them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """Whether this process is one of several joined by `session`."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that prints results and writes outputs."""
    return rank() == 0


def local_device(dev: torch.device) -> torch.device:
    """The device this process works on: under a launcher with several processes each takes its own GPU,
    cuda:LOCAL_RANK; otherwise `dev` as given."""
    if launched_size() > 1 and dev.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


@contextmanager
def session(dev: torch.device) -> Iterator[None]:
    """Join the launcher's processes for the block (nothing happens with one process, or when they are
    already joined). The group is taken down however the block ends: a failed rank aborts its NCCL
    communicators rather than waiting for work its peers will never match, and exits, so the launcher
    stops the others; gloo peers see the closed connection at once."""
    if launched_size() <= 1 or dist.is_initialized():
        yield
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    failed = True
    try:
        yield
        failed = False
    finally:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if failed and dev.type == "cuda" and abort is not None:
            abort()
        else:
            dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python argv...` as `nproc` processes through torch.distributed.run (torchrun) on this host and
    return its exit status. Each process gets an equal share of the CPU threads unless OMP_NUM_THREADS
    says otherwise (torchrun's own default is one thread, which slows the allocator's CPU work)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]
    launcher = subprocess.Popen(command, env=env)
    try:
        return launcher.wait()
    except BaseException:  # SIGINT/SIGTERM here: torchrun passes SIGTERM on to its processes
        launcher.terminate()
        launcher.wait()
        raise


# ---------------------------------------------------------------- data parallel: windows and sums


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the rows of `x` (windows); the sizes differ by at most one."""
    if not active():
        return x
    n, r, w = x.shape[0], rank(), size()
    return x[r * n // w:(r + 1) * n // w]


def total(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the ranks, in place (a sum of NLLs, of squared gradients)."""
    if active():
        with collective("summing across processes"):
            dist.all_reduce(x)
    return x


def reduce_hessians(solvers: dict[str, Any]) -> None:
    """Make every solver (SparseGPT) hold the statistics of all ranks' windows: X^T X and the token count
    summed, the per-channel activation peak maxed. The sums are the unscaled ones: the solver divides by
    the token count itself (H = 2/n X^T X), so it must see the total n, not one rank's."""
    if not active():
        return
    keys = sorted(solvers)
    with collective("summing the Hessians"):
        for k in keys:
            dist.all_reduce(solvers[k].xtx)
            dist.all_reduce(solvers[k].peak, op=dist.ReduceOp.MAX)
        if keys:
            device = solvers[keys[0]].xtx.device
            counts = torch.tensor([solvers[k].ntokens for k in keys], dtype=torch.int64, device=device)
            dist.all_reduce(counts)
            for k, n in zip(keys, counts.tolist()):
                solvers[k].ntokens = n


# ---------------------------------------------------------------- the Linears of a layer


def solve_cost(columns: int, rows: list[int]) -> int:
    """Flop estimate of solving Linears that share one input of `columns` channels: one inverse factor
    (~columns^3) and, per Linear, the error updates of its solve (~rows * columns^2)."""
    return columns ** 3 + sum(rows) * columns ** 2


def assign(names: list[str], linears: dict[str, nn.Linear], shared: dict[str, str]) -> dict[str, int]:
    """The rank that solves each of `names`, and each of their Hessian groups (the key of `shared`'s
    values: q/k/v go where q_proj's Hessian goes). Largest group first to the least-loaded rank (the
    lowest on a tie): from the shapes alone, so every rank computes the same answer."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(shared.get(n, n), []).append(n)
    cost = {k: solve_cost(linears[k].in_features, [linears[n].out_features for n in members])
            for k, members in groups.items()}
    load = [0] * size()
    owners: dict[str, int] = {}
    for k in sorted(groups, key=lambda k: (-cost[k], names.index(groups[k][0]))):
        owner = min(range(size()), key=lambda r: (load[r], r))
        load[owner] += cost[k]
        owners[k] = owner
        for n in groups[k]:
            owners[n] = owner
    return owners


def share_linears(names: list[str], linears: dict[str, nn.Linear], owners: dict[str, int],
                  solved: dict[str, tuple]) -> dict[str, tuple]:
    """After each rank solved its own Linears (`solved`: name -> its record, tensors anywhere): every
    rank gets every compressed weight, in place, and every record, with its tensors on the CPU."""
    mine = {n: tuple(_to_cpu(v) for v in record) for n, record in solved.items()}
    with collective("sharing the compressed weights"):
        for n in names:
            dist.broadcast(linears[n].weight.data, src=owners[n])
    records = {n: r for part in gather(mine) for n, r in part.items()}
    return {n: records[n] for n in names}


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one element without torchrun)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * size()
    with collective("gathering from the processes"):
        dist.all_gather_object(out, obj)
    return out


def _to_cpu(value: Any) -> Any:
    """A record's tensors (or a dataclass's tensor fields, QuantGrid's ranges) moved to the CPU, so that
    no rank unpickles a tensor on another rank's GPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import fields, replace

        moved = {f.name: getattr(value, f.name).cpu() for f in fields(value)
                 if isinstance(getattr(value, f.name), torch.Tensor)}
        return replace(value, **moved) if moved else value
    return value
