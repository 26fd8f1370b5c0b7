"""Several processes (distributed.py) against one: the same CLI runs as two gloo processes on the CPU give
one process's weights and perplexity up to the order of sums; a failure on one rank ends both.

The processes are forked from the test process (torch and transformers already imported: a fresh
interpreter takes 8 s to import them here) and find their rank, world size and rendezvous in the
environment, as torchrun hands them; `test_torchrun_launch` runs the real launcher once, through --gpus.
A few seconds. Run: python -m pytest -q test_distributed.py
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import opt_enhanced as oe
from systems import distributed

RUN = ["c4", "--nsamples", "8", "--seqlen", "64", "--batch_size", "2", "--eval", "wikitext2", "--quiet",
       "--device", "cpu"]
UNIFORM = ["--sparsity", "0.5", "--wbits", "4"]
MIXED = ["--sparsity", "0.5", "--wbits", "4", "--target_avg_bits", "3.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: Path, argvs: list[list[str]], patch: Callable[[int], None] | None,
               entry: Callable[[list[str]], int]) -> None:
    """One forked process: torchrun's environment, then each command line through `entry` (a main) in
    one process group; exit codes and stderr go to files in `out`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.stderr = open(out / f"rank{rank}.err", "w", buffering=1)
    if patch is not None:
        patch(rank)
    codes = []
    with distributed.session(torch.device("cpu")):
        for argv in argvs:
            codes.append(entry(argv))
    (out / f"rank{rank}.codes").write_text(json.dumps(codes))


def two_processes(out: Path, argvs: list[list[str]], patch: Callable[[int], None] | None = None,
                  timeout: float = 60, entry: Callable[[list[str]], int] = oe.main
                  ) -> tuple[list[list[int]], list[str]]:
    """Run the command lines as two processes; (exit codes, stderr) per rank. Fails instead of hanging.

    Forked where there is no GPU; spawned where there is: once a process has run a backward pass with CUDA
    present, autograd has started a thread per device, and a forked child cannot run backward (the mixed runs'
    loss sensitivities), so each process then imports torch and transformers afresh."""
    method = "spawn" if torch.cuda.is_available() else "fork"
    timeout += 60 if method == "spawn" else 0
    context = mp.start_processes(_rank_main, (free_port(), out, argvs, patch, entry), nprocs=2, join=False,
                                 start_method=method)
    deadline = time.time() + timeout
    while not context.join(timeout=0.2):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"two processes still running after {timeout:.0f} s: a collective hangs")
    codes = [json.loads(f.read_text()) if (f := out / f"rank{r}.codes").exists() else None for r in range(2)]
    return codes, [(out / f"rank{r}.err").read_text() for r in range(2)]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory) -> Path:
    """The uniform and the mixed run, each as one process (in this one) and as two."""
    model, data = tiny_dir
    root = tmp_path_factory.mktemp("distributed")
    argvs = {}
    for name, flags in (("uniform", UNIFORM), ("mixed", MIXED)):
        for procs in ("one", "two"):
            (root / procs).mkdir(exist_ok=True)
            argvs[name, procs] = [str(model), *RUN, "--data_dir", str(data), *flags, "--save",
                                  str(root / procs / f"{name}.save"), "--results_json", str(root / procs / f"{name}.json")]
    for name in ("uniform", "mixed"):
        assert oe.main(argvs[name, "one"]) == 0
    codes, errors = two_processes(root / "two", [argvs["uniform", "two"], argvs["mixed", "two"]])
    assert codes == [[0, 0], [0, 0]], errors
    return root


def test_uniform_run_equals_one_process(runs):
    one, two = (json.loads((runs / p / "uniform.json").read_text()) for p in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    a, b = weights(runs / "one" / "uniform.save"), weights(runs / "two" / "uniform.save")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    layer0 = a["model.decoder.layers.0.fc1.weight"]
    assert (layer0 == 0).float().mean() >= 0.5  # it was compressed
    assert two["perplexity"]["wikitext2"] == pytest.approx(one["perplexity"]["wikitext2"], rel=1e-6)
    assert [s["kept"] for s in two["layers"]] == [s["kept"] for s in one["layers"]]
    assert [s["name"] for s in two["layers"]] == [s["name"] for s in one["layers"]]


def test_mixed_run_is_on_target(runs):
    """Across processes the stored-bit drift reaches the next layer instead of the next Linear
    (StoredBits.side_by_side): the first Linear is solved as one process solves it, and the model's
    stored average stays on target."""
    one, two = (json.loads((runs / p / "mixed.json").read_text()) for p in ("one", "two"))
    assert abs(two["summary"]["stored_bits"] - 3.5) <= 0.02 and abs(one["summary"]["stored_bits"] - 3.5) <= 0.02
    a, b = weights(runs / "one" / "mixed.save"), weights(runs / "two" / "mixed.save")
    first = one["layers"][0]["name"] + ".weight"
    assert torch.allclose(a[first], b[first], rtol=0, atol=1e-5)
    assert two["layers"][0]["bits_per_column"] == one["layers"][0]["bits_per_column"]
    assert two["perplexity"]["wikitext2"] == pytest.approx(one["perplexity"]["wikitext2"], rel=0.02)


def test_only_rank_zero_writes(runs):
    assert sorted(p.name for p in (runs / "two").iterdir()) == \
        ["mixed.json", "mixed.save", "rank0.codes", "rank0.err", "rank1.codes", "rank1.err",
         "uniform.json", "uniform.save"]


def _fail_on_rank_one(rank: int) -> None:
    if rank == 1:
        import pipeline.compress

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")
        pipeline.compress.compress_linear = broken


def test_a_failure_on_one_rank_ends_both(tiny_dir, tmp_path):
    model, data = tiny_dir
    argv = [str(model), *RUN, "--data_dir", str(data), *UNIFORM, "--results_json", str(tmp_path / "r.json")]
    codes, errors = two_processes(tmp_path, [argv], _fail_on_rank_one, timeout=30)
    assert codes == [[1], [1]], errors
    assert "error: rank 1: injected failure" in errors[1]
    assert "error: rank 0: lost contact with the other processes" in errors[0]
    assert not (tmp_path / "r.json").exists()


def test_bench_synthetic_on_two_processes(tmp_path):
    import bench

    out = tmp_path / "bench.json"
    flags = ["--device", "cpu", "--nsamples", "4", "--seqlen", "16", "--sparsity", "0.5", "--wbits", "4"]
    codes, errors = two_processes(tmp_path, [["--synthetic", "opt-tiny", "--json", str(out), "--", *flags]],
                                  entry=bench.main)
    assert codes == [[0], [0]], errors
    res = json.loads(out.read_text())
    assert res["processes"] == 2 and len(res["by_process"]) == 2 and res["layers"] == 2
    assert all(p["host_peak_gib"] > 0 for p in res["by_process"]) and res["compress_s"] > 0


def test_assignment_balances_by_solver_cost():
    """OPT's fc2 (4x the columns) outweighs the rest of the layer together; q/k/v stay with their Hessian."""
    from conftest import tiny_model
    from modelutils import decoder_of, find_linears

    model = tiny_model(layers=1, hidden=64, ffn=256)
    linears = find_linears(model.model.decoder.layers[0])
    names, shared = list(linears), decoder_of(model).shared_input
    costs = {n: distributed.solve_cost(linears[n].in_features, [linears[n].out_features]) for n in names}
    assert costs["fc2"] > sum(c for n, c in costs.items() if n != "fc2")

    class Two:  # assign() asks distributed.size() for the number of ranks
        def __enter__(self):
            self.size, distributed.size = distributed.size, lambda: 2

        def __exit__(self, *exc):
            distributed.size = self.size

    with Two():
        owners = distributed.assign(names, linears, shared)
    assert owners["fc2"] == 0 and {owners[n] for n in names if n != "fc2"} == {1}
    assert owners["self_attn.q_proj"] == owners["self_attn.k_proj"] == owners["self_attn.v_proj"]


@pytest.mark.slow
def test_torchrun_launch(tiny_dir, tmp_path, capfd, quick_rendezvous):
    """The real launcher, through --gpus 2 on the CPU: one JSON line on stdout (rank 0), one results file."""
    model, data = tiny_dir
    out = tmp_path / "r.json"
    code = oe.main([str(model), *RUN, "--data_dir", str(data), *UNIFORM, "--gpus", "2", "--results_json", str(out)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and "wikitext2" in json.loads(lines[0])["perplexity"]
    assert json.loads(out.read_text())["processes"] == 2
