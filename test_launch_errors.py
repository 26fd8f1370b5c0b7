"""`--gpus N`: the job reads like one run (issue 30). A usage error on any process is one line and exit 2; a failure
names its first cause once; Ctrl-C is one line and 130; nothing is left in the temporary directory; what can be
checked about the launch is checked before any process starts.

The launcher (distributed.launch: torch.distributed's elastic agent, in this process) starts real processes here.
Most tests give it small Python children that follow the processes' side of the protocol (distributed.report)
without importing torch, so that a launch takes half a second; one test launches the CLI itself on two CPU
processes (gloo). Run: python -m pytest -q test_launch_errors.py
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

import distributed
import opt_enhanced as oe
from runtime import sigterm_interrupts

# A child process of the launcher, as small as one can be: it reports `line` with exit `code` (kind `kind`) per
# rank, after `delay` seconds, the way distributed.report does, and exits `linger` seconds later; a rank not in
# `ranks` sleeps until it is stopped, and `kill` makes one end by SIGKILL without a report.
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
if entry.get("kill"):
    os.kill(os.getpid(), 9)
if entry.get("line"):
    reports = os.environ["OPT_ENHANCED_LAUNCH_REPORTS"]
    with open(os.path.join(reports, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "code": entry["code"], "line": entry["line"], "kind": entry["kind"],
                   "time": time.time()}, f)
time.sleep(entry.get("linger", 0))
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


def test_the_first_cause_is_said_not_the_lost_contact_it_caused(tmp_path, private_tmp, capfd):
    """Rank 0 reports a lost contact first and is still ending when rank 1's own failure comes in."""
    ranks = {"1": {"code": 1, "line": "error: rank 1: NaN/Inf in the weight", "kind": "failed", "delay": 0.3},
             "0": {"code": 1, "line": "error: rank 0: lost contact with the other processes", "kind": "lost",
                   "linger": 5}}
    assert launch_children(tmp_path, ranks) == 1
    assert one_line(capfd) == "error: rank 1: NaN/Inf in the weight"
    assert os.listdir(private_tmp) == []


def test_a_process_killed_without_a_word_is_named(tmp_path, private_tmp, capfd):
    assert launch_children(tmp_path, {"1": {"code": 1, "kill": True}}) == 1
    line = one_line(capfd)
    assert "rank 1 of 2 was killed by SIGKILL" in line and "out of memory" in line
    assert not any(_alive(p) for p in _pids(tmp_path))  # rank 0 (asleep) was stopped with the job
    assert os.listdir(private_tmp) == []


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

    GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=260, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "gpt2")
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
    monkeypatch.setattr(oe, "check_model", stopped)
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


@pytest.mark.slow  # two fresh interpreters import torch and transformers
def test_the_cli_on_two_processes_says_a_usage_error_once(tmp_path, private_tmp, capfd):
    """The issue's case end to end: `--gpus 2` on a GPT-2 directory, each process finding it."""
    from transformers import GPT2Config

    from conftest import write_tokenizer

    GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=260, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path / "gpt2")
    write_tokenizer(tmp_path / "gpt2")
    capfd.readouterr()
    code = oe.main([str(tmp_path / "gpt2"), "c4", "--device", "cpu", "--gpus", "2", "--nsamples", "2", "--quiet",
                    "--results_json", str(tmp_path / "r.json")])
    assert code == 2 and "is a 'gpt2' model" in one_line(capfd)
    # torch's compile cache (torchinductor_USER, made by importing torch._dynamo, as transformers does) is one per
    # user and machine, reused by every run: not the job's
    left = [name for name in os.listdir(private_tmp) if not name.startswith("torchinductor_")]
    assert left == [] and not (tmp_path / "r.json").exists()
