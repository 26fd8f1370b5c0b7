"""Several processes of one host, one GPU each, through torch.distributed.

    torchrun --standalone --nproc_per_node 2 opt_enhanced.py MODEL DATASET [flags]
    python opt_enhanced.py MODEL DATASET --gpus 2 [flags]        (the same launch, by `launch` in this process)

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

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from systems.interrupts import Interrupted


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


def check_launch(processes: int, device_type: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` (one line, with the fix) where `processes` processes on `device_type` cannot start, before any
    process does: torch without torch.distributed or the backend (NCCL for CUDA, gloo for the CPU), a host that does
    not resolve localhost (the launcher's rendezvous listens there), no writable temporary directory (the processes
    report their errors to the launcher through one). A run under torchrun needs the backend alone."""
    backend, ready = ("nccl", dist.is_nccl_available) if device_type == "cuda" else ("gloo", dist.is_gloo_available)
    if not dist.is_available() or not ready():
        raise error(f"{processes} processes on {device_type} need torch.distributed with {backend}, which this torch "
                    f"build lacks; install a torch wheel with it, or run one process (drop --gpus)")
    if launched_size() > 1:  # torchrun started us: the launch is done
        return
    import socket
    import tempfile

    try:
        socket.getaddrinfo("localhost", None)
    except OSError as e:
        raise error(f"--gpus {processes}: this host cannot resolve localhost ({e}), where the processes meet; add "
                    f"localhost to /etc/hosts") from None
    try:
        tempfile.TemporaryDirectory(prefix="opt-enhanced-check-").cleanup()
    except OSError as e:
        raise error(f"--gpus {processes}: cannot create a temporary directory ({e}); set TMPDIR to a writable "
                    f"directory") from None


# Set by `launch` for the processes it starts: the directory where each process leaves its error line (`report`).
REPORTS = "OPT_ENHANCED_LAUNCH_REPORTS"


def report(error: BaseException, code: int, line: str) -> bool:
    """Under `launch`, hand this process's one-line error (`line`, exit `code`) to the launcher, which prints one
    line for the whole job once every process has ended, and return True; elsewhere (one process, torchrun run by
    hand) return False: the caller prints it. Why not print here: every process would, and a process that the
    launcher stops after another one failed would add its own "terminated" or "lost contact" line."""
    directory = os.environ.get(REPORTS)
    if not directory:
        return False
    kind = "interrupted" if isinstance(error, (KeyboardInterrupt, Interrupted)) else \
        "lost" if isinstance(error, PeerLost) else "failed"
    record = {"rank": launched_rank(), "code": code, "line": line, "kind": kind, "time": time.time()}
    path = os.path.join(directory, f"rank{launched_rank()}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except OSError:
        return False  # the launcher is gone or its directory too: say it here
    return True


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python argv...` as `nproc` processes through torch.distributed's elastic launcher (what torchrun
    --standalone runs) in this process, and return the job's exit code, having printed at most one line.

    In this process rather than as a torchrun subprocess, so that the job reads like one run: the processes report
    their error lines here (`report`) and this prints the first cause (a failure before a lost contact, either
    before an interruption) with its exit code, 2 for a usage error; torchrun's own logging and its ChildFailedError
    report stay silent; SIGINT/SIGTERM raise here as in any run (the launcher's own handlers, which would raise its
    SignalException, are not installed), and the launcher stops the processes (SIGTERM, which they clean up after)
    before the exception leaves; its log directory is /dev/null and the reports' directory goes at the end, so
    nothing is left in the temporary directory. The processes run in sessions of their own, so a Ctrl-C at the
    terminal reaches this process alone. Each process gets an equal share of the CPU threads unless
    OMP_NUM_THREADS says otherwise (torchrun's own default is one thread, which slows the allocator's CPU work)."""
    import logging
    import shutil
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    reports = tempfile.mkdtemp(prefix="opt-enhanced-launch-")
    saved_env, saved_logging = dict(os.environ), logging.root.manager.disable
    try:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        os.environ[REPORTS] = reports
        logging.disable(logging.CRITICAL)  # the launcher's INFO/WARNING/ERROR lines about the processes
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              logs_specs=DefaultLogsSpecs(log_dir=os.devnull),
                              signals_to_handle="")  # no handler of its own: ours (runtime.sigterm_interrupts) stay
        try:
            elastic_launch(config, sys.executable)("-u", *argv)
            return 0
        except ChildFailedError as e:
            failures = {rank: (f.exitcode, f.timestamp) for rank, f in e.failures.items()}
        code, line = job_outcome(reports, failures, nproc)
        print(line, file=sys.stderr)
        return code
    finally:
        logging.disable(saved_logging)
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(reports, ignore_errors=True)


def job_outcome(reports: str, failures: dict[int, tuple[int, float]], nproc: int) -> tuple[int, str]:
    """(exit code, the one error line) of a job whose processes `failures` ({rank: (exit code, time)}) failed:
    the earliest report (`report`, in the directory `reports`) of a failure, else of a lost contact, else of an
    interruption; without any, the first failed process's end (a signal: killed from outside, out of memory say)."""
    records = []
    for name in os.listdir(reports):
        if name.endswith(".json"):
            try:
                with open(os.path.join(reports, name)) as f:
                    records.append(json.load(f))
            except (OSError, ValueError):
                pass
    for kind in ("failed", "lost", "interrupted"):
        chosen = sorted((r for r in records if r.get("kind") == kind), key=lambda r: r["time"])
        if chosen:
            return int(chosen[0]["code"]), chosen[0]["line"]
    rank, (code, _) = min(failures.items(), key=lambda item: item[1][1])
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (out of memory? see the system log)" if name == "SIGKILL" else ""
        return 1, f"error: the process of rank {rank} of {nproc} was killed by {name}{hint}; the job stopped"
    return 1, (f"error: the process of rank {rank} of {nproc} ended with exit code {code} without a message; the job "
               f"stopped")


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
