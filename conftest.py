"""Shared test setup: one torch thread, the `slow` marker, the costliest tests first (and xdist's work
stealing, so the two workers finish together), and tiny OPT models and data built once.

Why one thread: the machines have 2 cores and the tests' matrices are tiny. On an idle machine one
thread is as fast as two (test_enhanced, test_export, test_solver and test_pipeline: 14.6-15.9 s
either way); beside one other busy process (a second test run, a CLI run), torch's two threads wait
on each other: test_enhanced.py and test_export.py took 160-197 s on two threads, 14 s on one.
The test command (`pytest -q -n 2`) runs two such single-threaded workers, one per core: 52-55 s instead
of 62-72 s. Subprocesses that tests start get one thread too (OMP_NUM_THREADS, which torch, NumPy and
their BLAS read at start): while a worker waits for its child, the other worker keeps its own core busy,
so a two-threaded child oversubscribes the machine. The comparison script (bench.py, 9 runs) took 31 CPU
seconds on two threads and 10 on one, beside other busy processes. For the same reason the Rust
tokenizers encode batches on one thread (TOKENIZERS_PARALLELISM=false): test_datautils.py took 35-36
CPU seconds (37-40 s wall) that way and 39-43 (55-77 s) on two threads, beside other busy processes.

torch and transformers are imported where they are used, not at the top: pytest-xdist's controller
loads this file too, and importing them there (5-6 CPU seconds) delayed the start of the workers,
which import them again for the tests.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from transformers import OPTForCausalLM

ROOT = Path(__file__).resolve().parent  # the repository: the CLI, its modules and scripts

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; inherited by every subprocess a test starts
os.environ["TOKENIZERS_PARALLELISM"] = "false"

# End-to-end tests in modules this file does not own, marked here by node id or file (the rest carry
# @pytest.mark.slow): the comparison script (nine runs in one bench.py process) and lm-evaluation-harness (its import alone
# takes seconds).
SLOW_ELSEWHERE = ("test_enhanced.py::test_comparison_script_runs_and_checks_targets", "tests/test_lm_eval.py::")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (CLI, subprocesses, real data, Triton's interpreter); "
                                       "still in the default run, skip them with -m 'not slow'")
    if config.getoption("dist", default="no") == "no" or hasattr(config, "workerinput"):  # not xdist's controller
        import torch

        torch.set_num_threads(1)
        if hasattr(config, "workerinput"):  # an xdist worker imports transformers for its tests anyway
            import modelutils

            modelutils.import_transformers()  # as the CLI does: without scikit-learn (1.2 s, unused)


# The costliest tests, costliest first (seconds on the 2-core machine in the test command: Triton's interpreter
# 8.1, the child processes 4-8 each). They
# run before the other slow tests, which run before the rest, so that no worker is left with a long test
# at the end while the other one waits.
COSTLIEST = ("tests/test_triton_interpret.py::test_kernels_under_the_triton_interpreter",
             "tests/test_cli.py::test_the_command_in_a_fresh_process_without_root_powers",
             "tests/test_distributed.py::test_torchrun_launch",
             "test_enhanced.py::test_comparison_script_runs_and_checks_targets",
             "tests/test_datautils.py::test_cache_is_shared_with_another_process")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW_ELSEWHERE):
            item.add_marker(pytest.mark.slow)

    def rank(item: pytest.Item) -> int:
        for k, nodeid in enumerate(COSTLIEST):
            if item.nodeid.startswith(nodeid):
                return k
        return len(COSTLIEST) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)  # stable: file order within each rank, the same on every worker


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`-n N` (xdist's default --dist load) runs with work stealing: each worker starts on half of the
    ordered tests and an idle one takes unstarted tests from the other. --dist load hands out chunks
    of 50 tests at first, so one worker would have got all the costliest ones."""
    if config.getoption("dist") == "load":
        from xdist.scheduler import WorkStealingScheduling

        return WorkStealingScheduling(config, log)
    return None


# ---------------------------------------------------------------- tiny models and data


def tiny_model(layers: int = 2, hidden: int = 32, ffn: int = 64, vocab: int = 64, positions: int = 64,
               attn: str | None = None) -> OPTForCausalLM:
    """A random OPT (seed 0), fp32, eval mode. `attn="eager"` makes a layer called without its attention
    mask attend to later tokens (sdpa, the default, would fall back to causal attention by itself)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    extra = {} if attn is None else {"attn_implementation": attn}
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=4, max_position_embeddings=positions, word_embed_proj_dim=hidden,
                    dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2, **extra)
    return OPTForCausalLM(cfg).eval()


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE with no merges: every byte is a token (enough to exercise the real loaders)."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = iter(range(256, 512))  # GPT-2's byte-to-character map: unprintable bytes move past 255
    for byte in range(256):
        vocab[chr(byte if byte in printable else next(shifted))] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_prefix_space": False}))


def write_data(root: Path, words: int = 4000) -> None:
    """Files laid out like ../shared/data (WikiText-2, PTB, C4), of random words from a small lexicon."""
    import torch

    g = torch.Generator().manual_seed(0)
    lexicon = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "with", "it"]

    def text(n: int) -> str:
        return " ".join(lexicon[i] for i in torch.randint(0, len(lexicon), (n,), generator=g).tolist())

    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(f" {text(40)} \n \n" for _ in range(words // 40)))
    (root / "wikitext-2-raw" / "wiki.train.raw").write_text("".join(f" {text(40)} \n" for _ in range(words // 40)))
    (root / "ptb").mkdir()
    for split in ("train", "valid", "test"):
        (root / "ptb" / f"ptb.{split}.txt").write_text("".join(f" {text(20)} \n" for _ in range(words // 20)))
    (root / "c4").mkdir()
    for name in ("c4-train.00000-of-01024.json.gz", "c4-validation.00000-of-00008.json.gz"):
        with gzip.open(root / "c4" / name, "wt") as f:
            for _ in range(30):
                f.write(json.dumps({"text": text(300)}) + "\n")


@pytest.fixture
def quick_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that launch processes in this one (distributed.launch): torch's elastic rendezvous names each of
    its events after its caller by walking the whole stack with source lines (inspect.stack(), twice per event),
    which under pytest's deep stack took about 2 CPU seconds per launch; the name is only logged."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    monkeypatch.setattr(dynamic_rendezvous, "get_method_name", lambda depth=2: "rendezvous")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory, data directory): a 2-layer OPT with a byte tokenizer, and offline data for it.
    Built once per session; tests must not write into it."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model(vocab=260, positions=128)
    model.save_pretrained(root / "model")
    write_tokenizer(root / "model")
    write_data(root / "data")
    return root / "model", root / "data"


def cli(tiny_dir: tuple[Path, Path], tmp_path: Path, *flags: str) -> tuple[int, dict]:
    """opt_enhanced.main on the tiny model and data (4 windows of 64 tokens, CPU, quiet), and its results JSON read
    back ({} when none was written)."""
    import opt_enhanced

    model, data = tiny_dir
    out = tmp_path / "r.json"
    code = opt_enhanced.main([str(model), "c4", "--data_dir", str(data), "--nsamples", "4", "--seqlen", "64",
                              "--quiet", "--device", "cpu", "--results_json", str(out), *flags])
    return code, json.loads(out.read_text()) if out.exists() else {}
