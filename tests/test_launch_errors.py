"""`--gpus N`: the job reads like one run. A usage error on any process is one line and exit 2; a failure
names its first cause once; Ctrl-C is one line and 130; nothing is left in the temporary directory; what can be
checked about the launch is checked before any process starts.

The launcher (distributed.launch: torch.distributed's elastic agent, in this process) starts real processes here:
small Python children that follow the processes' side of the protocol (distributed.report) without importing
torch, so that a launch takes half a second; the processes' side runs in this process, as a rank of two. The CLI
itself on two gloo processes is test_distributed.test_torchrun_launch (each process imports torch and
transformers: seconds). Run: python -m pytest -q test_launch_errors.py
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import opt_enhanced as oe
import pipeline.cli
from systems import distributed

pytestmark = pytest.mark.usefixtures("quick_rendezvous")

# A child process of the launcher, as small as one can be: it reports `line` with exit `code` (kind `kind`) per
# rank, after `delay` seconds, the way distributed.report does, and exits; a rank not in `ranks` sleeps until it is
# stopped. Each writes its pid first.
CHILD = r'''
import json, os, sys, time
spec = json.loads(sys.argv[1])
rank = os.environ["RANK"]
open(os.path.join(spec["pids"], f"{rank}.pid"), "w").write(str(os.getpid()))
entry = spec["ranks"].get(rank)
if entry is None:
    time.sleep(60)
    sys.exit(0)
time.sleep(entry.get("delay", 0))
with open(os.path.join(os.environ["OPT_ENHANCED_LAUNCH_REPORTS"], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": int(rank), "code": entry["code"], "line": entry["line"], "kind": entry["kind"],
               "time": time.time()}, f)
sys.exit(entry["code"])
'''


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary directory of the test's own, for this process (tempfile caches its choice) and its children."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def launch_children(tmp_path: Path, ranks: dict[str, dict]) -> int:
    """distributed.launch over two CHILD processes that behave as `ranks` says."""
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    return distributed.launch(2, ["-c", CHILD, json.dumps({"pids": str(pids), "ranks": ranks})])


def one_line(capfd) -> str:
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_a_usage_error_on_every_process_is_said_once_with_exit_2(tmp_path, private_tmp, capfd):
    usage = {"code": 2, "line": "error: --flag is wrong", "kind": "failed"}
    assert launch_children(tmp_path, {"0": usage, "1": dict(usage, delay=0.2)}) == 2
    assert one_line(capfd) == "error: --flag is wrong"
    assert os.listdir(private_tmp) == []  # neither torchelastic_* nor the reports' directory


def test_the_job_says_its_first_cause(tmp_path):
    """What the launcher prints of the processes' reports (distributed.job_outcome): a failure before the lost
    contact it caused in the others (even one reported later), either before an interruption (the processes the
    launcher stopped), and without any report, how the first failed process ended."""
    def report(rank: int, kind: str, line: str, at: float, code: int = 1) -> None:
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "code": code, "line": line,
                                                              "kind": kind, "time": at}))

    failures = {0: (1, 10.0), 1: (1, 10.5)}
    report(0, "lost", "error: rank 0: lost contact with the other processes", at=1.0)
    report(1, "failed", "error: rank 1: NaN/Inf in the weight", at=2.0)
    assert distributed.job_outcome(str(tmp_path), failures, 2) == (1, "error: rank 1: NaN/Inf in the weight")
    report(1, "interrupted", "error: rank 1: terminated (SIGTERM)", at=0.5, code=143)
    assert distributed.job_outcome(str(tmp_path), failures, 2)[1].startswith("error: rank 0: lost contact")
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    line = distributed.job_outcome(str(tmp_path), {1: (-signal.SIGKILL, 3.0), 0: (-signal.SIGTERM, 4.0)}, 2)
    assert line == (1, "error: the process of rank 1 of 2 was killed by SIGKILL (out of memory? see the system "
                       "log); the job stopped")
    assert distributed.job_outcome(str(tmp_path), {0: (3, 1.0)}, 2) == \
        (1, "error: the process of rank 0 of 2 ended with exit code 3 without a message; the job stopped")


def _pids(tmp_path: Path) -> list[int]:
    return [int(p.read_text()) for p in (tmp_path / "pids").iterdir()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_is_one_line_and_stops_every_process(tmp_path, private_tmp, capfd, monkeypatch):
    """SIGINT reaches the launcher alone (the processes run in sessions of their own, so a terminal's Ctrl-C finds
    only it): main() says one line with 130 once the launcher has stopped both processes. (SIGTERM takes the same
    way: runtime.sigterm_interrupts raises for both.)"""
    signum, code, word = signal.SIGINT, 130, "interrupted (SIGINT)"
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = json.dumps({"pids": str(pids), "ranks": {}})  # both ranks sleep
    real = distributed.launch
    monkeypatch.setattr(distributed, "launch", lambda n, argv: real(n, ["-c", CHILD, spec]))

    def signal_once_both_run() -> None:
        deadline = time.time() + 30
        while len(os.listdir(pids)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)
    threading.Thread(target=signal_once_both_run, daemon=True).start()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    got = oe.main(["m", "c4", "--device", "cpu", "--gpus", "2", "--nsamples", "2"])
    assert got == code and {s: signal.getsignal(s) for s in before} == before
    line = one_line(capfd)
    assert word in line and "while running 2 processes" in line, line
    assert not any(_alive(p) for p in _pids(tmp_path))
    assert os.listdir(private_tmp) == []


# ---------------------------------------------------------------- the processes' side, in this process


def as_rank(monkeypatch, reports: Path, rank: int = 1) -> None:
    """This process as rank `rank` of two started by `launch` (before the process group is joined)."""
    for key, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=1,
                           OPT_ENHANCED_LAUNCH_REPORTS=reports).items():
        monkeypatch.setenv(key, str(value))


def test_a_process_hands_its_error_to_the_launcher_instead_of_printing_it(tmp_path, capfd, monkeypatch):
    """Rank 1 of a --gpus job meets a usage error (a GPT-2 directory): nothing on its stderr, its report says it."""
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=260, bos_token_id=0, eos_token_id=0)
    config.save_pretrained(tmp_path / "gpt2")
    capfd.readouterr()
    as_rank(monkeypatch, tmp_path)
    assert oe.main([str(tmp_path / "gpt2"), "c4", "--device", "cpu", "--nsamples", "2", "--quiet"]) == 2
    assert capfd.readouterr().err == ""
    record = json.loads((tmp_path / "rank1.json").read_text())
    assert record["code"] == 2 and record["kind"] == "failed" and "is a 'gpt2' model" in record["line"]


def test_an_interrupted_process_reports_quietly(tmp_path, capfd, monkeypatch):
    """The launcher stops the processes with SIGTERM when the job ends early: they clean up and say nothing."""
    def stopped(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.cli, "check_model", stopped)
    as_rank(monkeypatch, tmp_path, rank=0)
    assert oe.main(["m", "c4", "--device", "cpu", "--nsamples", "2", "--results_json", str(tmp_path / "r.json")]) == 130
    assert capfd.readouterr().err == ""
    assert json.loads((tmp_path / "rank0.json").read_text())["kind"] == "interrupted"


def test_the_launch_is_checked_before_any_process_starts(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("launched"))
    argv = ["m", "c4", "--device", "cpu", "--gpus", "2", "--nsamples", "2"]
    with monkeypatch.context() as m:
        m.setattr(torch.distributed, "is_gloo_available", lambda: False)
        assert oe.main(argv) == 2
    assert "need torch.distributed with gloo" in one_line(capfd)
    with monkeypatch.context() as m:
        m.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
        assert oe.main(argv) == 2
    assert "set TMPDIR to a writable directory" in one_line(capfd)
