"""Tests for datautils: the reference protocol's ids, the local layout, the errors, and the caches.

Most tests read ../shared (real WikiText-2, PTB, C4 files and two OPT tokenizers) and are skipped without it.
"""

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Tokenizer, PreTrainedTokenizerFast

import datautils
from conftest import ROOT
from datautils import DATASETS, DataError, get_calibration, get_eval_ids
from tokenizer_loading import get_tokenizer

HERE = ROOT
SHARED = HERE.parent / "shared"
DATA = SHARED / "data"
OPT_MINI = SHARED / "models" / "opt-mini"
OPT_FILES = DATA / "opt-tokenizer"
C4_TRAIN = DATA / "c4" / "c4-train.00000-of-01024.first1041.json.gz"

needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")


@pytest.fixture(scope="module")
def mini():
    if not OPT_MINI.is_dir():
        pytest.skip(f"{OPT_MINI} is absent")
    return get_tokenizer(str(OPT_MINI))


@pytest.fixture(scope="module")
def opt():
    if not OPT_FILES.is_dir():
        pytest.skip(f"{OPT_FILES} is absent")
    return GPT2Tokenizer(vocab=str(OPT_FILES / "vocab.json"), merges=str(OPT_FILES / "merges.txt"),
                         bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                         add_bos_token=True)


@pytest.fixture
def no_datasets(monkeypatch):
    """Make `import datasets` fail, so a test proves its path never needs it."""
    monkeypatch.setitem(sys.modules, "datasets", None)


@pytest.fixture
def fresh_memo(monkeypatch):
    """An empty in-process memo for this test only; the module's memo (shared by the other tests) is kept."""
    monkeypatch.setattr(datautils, "_MEMO", {})


def tiny_ptb(root: Path, words: int) -> Path:
    (root / "ptb").mkdir(parents=True)
    text = " ".join(f"word{k % 7}" for k in range(words))
    for split in ("train", "test"):
        (root / "ptb" / f"ptb.{split}.txt").write_text(f" {text} \n")
    return root


def write_c4(root: Path, docs: list[str]) -> None:
    (root / "c4").mkdir()
    with gzip.open(root / "c4" / f"c4-train.00000-of-01024.first{len(docs)}.json.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_dataset_lists_the_choices():
    for call in (lambda: get_eval_ids("wikitext103", None, 2048),
                 lambda: get_calibration("wikitext103", None, 8, 0, 2048)):
        with pytest.raises(DataError, match="wikitext2, ptb, c4"):
            call()


@pytest.mark.parametrize("name, relpath", [("wikitext2", "wikitext-2-raw/wiki.test.raw"),
                                           ("ptb", "ptb/ptb.test.txt"),
                                           ("c4", "c4/c4-validation.00000-of-00008.json.gz")])
def test_missing_file_names_the_path_and_flag(tmp_path, name, relpath):
    with pytest.raises(DataError) as e:
        get_eval_ids(name, None, 2048, data_dir=str(tmp_path))
    message = str(e.value)
    assert str(tmp_path / relpath) in message and "--data_dir" in message and "\n" not in message


def test_missing_wikitext2_calibration_names_the_raw_train_file(tmp_path):
    with pytest.raises(DataError, match="wiki.train.raw.*--data_dir"):
        get_calibration("wikitext2", None, 8, 0, 2048, data_dir=str(tmp_path))


def test_empty_file_is_a_data_error(tmp_path, mini, no_datasets):
    write_c4(tmp_path, [])
    with pytest.raises(DataError, match="has no rows.*--data_dir"):
        get_calibration("c4", mini, 2, 0, 64, data_dir=str(tmp_path))


def test_hub_path_without_datasets_asks_for_data_dir(mini, no_datasets):
    with pytest.raises(DataError, match="not installed.*--data_dir DIR") as e:
        get_eval_ids("ptb", mini, 2048)
    assert "\n" not in str(e.value)


def test_too_little_text_says_found_and_needed(tmp_path, mini, no_datasets):
    data = tiny_ptb(tmp_path, 20)
    with pytest.raises(DataError, match=r"has \d+ tokens; seqlen 2048 needs at least 2049"):
        get_calibration("ptb", mini, 4, 0, 2048, data_dir=str(data))
    with pytest.raises(DataError, match=r"has \d+ tokens; .* needs at least 2048"):
        get_eval_ids("ptb", mini, 2048, data_dir=str(data))


def test_c4_without_a_long_enough_document(tmp_path, mini, no_datasets):
    write_c4(tmp_path, ["short one", "a little longer document", "tiny"])
    with pytest.raises(DataError, match=r"longest of 3: \d+ tokens\); need one of at least 65"):
        get_calibration("c4", mini, 2, 0, 64, data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation ids


@needs_shared
def test_wikitext2_eval_ids_match_the_published_counts(opt, mini, no_datasets):
    for tokenizer, count in ((opt, 287_645), (mini, 369_042)):
        ids = get_eval_ids("wikitext2", tokenizer, 2048, data_dir=str(DATA))
        assert ids.shape == (1, count) and ids.dtype == torch.int64
        assert ids[0, 0] == 2 and (ids == 2).sum() == 1  # one leading </s>, nowhere else


@needs_shared
def test_c4_eval_ids_are_cut_to_256_windows(mini, no_datasets):
    full = get_eval_ids("c4", mini, 4096, data_dir=str(DATA))  # 256 * 4096 is more than the 1025 docs give
    cut = get_eval_ids("c4", mini, 64, data_dir=str(DATA))
    assert cut.shape == (1, 256 * 64) and full.shape[1] > 256 * 64
    assert torch.equal(cut[0], full[0, :256 * 64])


@needs_shared
def test_long_text_in_pieces_gives_the_ids_of_the_whole(mini, monkeypatch):
    assert datautils._special_prefix(mini) == [2]  # OPT's byte-level BPE is cut into pieces...
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert datautils._special_prefix(PreTrainedTokenizerFast(tokenizer_object=words)) is None  # ...others are not
    tricky = "Title = \n\n a  b\n\nc 's 12 x\t\ty \u00a0z\n \n7 ,9 don't  \n\n\nEnd.\r\n ü ok "
    monkeypatch.setattr(datautils, "_PIECE_CHARS", 5)
    text = tricky * 40
    assert datautils.tokenize_long(mini, text).tolist() == mini(text)["input_ids"]


@needs_shared
@pytest.mark.slow
def test_c4_eval_ids_in_pieces_match_one_call(mini, no_datasets, fresh_memo):
    rows = datautils._source("c4", "validation", DATA).rows(datautils._C4_EVAL_DOCS)
    whole = mini(" ".join(rows))["input_ids"][:256 * 2048]
    assert get_eval_ids("c4", mini, 2048, data_dir=str(DATA))[0].tolist() == whole


@needs_shared
def test_eval_ids_are_a_copy(mini, no_datasets):
    ids = get_eval_ids("ptb", mini, 2048, data_dir=str(DATA))
    ids.zero_()
    assert get_eval_ids("ptb", mini, 2048, data_dir=str(DATA))[0, 0] == 2


# ---------------------------------------------------------------------------------------------------------------
# Calibration windows


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", DATASETS)
def test_calibration_windows_are_seeded(name, mini, no_datasets, tmp_path):
    data = DATA
    if name == "ptb":  # PTB's validation text as its train split: real text, a tenth of the tokenizing
        data = tmp_path
        (data / "ptb").mkdir()
        shutil.copy(DATA / "ptb" / "ptb.valid.txt", data / "ptb" / "ptb.train.txt")
    draw = lambda seed: get_calibration(name, mini, 8, seed, 512, data_dir=str(data))
    first = draw(0)
    assert first.shape == (8, 512) and first.dtype == torch.int64
    assert torch.equal(draw(0), first)
    assert not torch.equal(draw(1), first)


@needs_shared
def test_wikitext2_fallback_prints_one_line(mini, no_datasets, capsys):
    get_calibration("wikitext2", mini, 2, 0, 512, data_dir=str(DATA))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "raw WikiText-2 train split missing" in lines[0] and "wiki.valid.tokens" in lines[0]


def test_windows_at_the_length_boundary(tmp_path, mini, no_datasets):
    """n ids allow seqlen n - 1 (every window is ids[:n-1]) and not seqlen n, for a text and for a C4 document."""
    data = tiny_ptb(tmp_path, 40)
    text = " ".join((data / "ptb" / "ptb.train.txt").read_text().split())
    n = len(mini(text).input_ids)
    write_c4(data, ["tiny", text, "short one"])
    expected = torch.tensor(mini(text).input_ids[:n - 1]).expand(5, -1)
    for name in ("ptb", "c4"):
        assert torch.equal(get_calibration(name, mini, 5, 0, n - 1, data_dir=str(data)), expected)
        with pytest.raises(DataError):
            get_calibration(name, mini, 5, 0, n, data_dir=str(data))


@needs_shared
@pytest.mark.slow
def test_text_windows_match_the_reference_draw(mini, no_datasets, tmp_path):
    """PTB train sentences joined with " ", tokenized once; global random.seed then randint per window. The
    calibration reads a data directory whose train split is PTB's validation text (real text, a tenth of the
    tokenizing)."""
    (tmp_path / "ptb").mkdir()
    shutil.copy(DATA / "ptb" / "ptb.valid.txt", tmp_path / "ptb" / "ptb.train.txt")
    rows = [line.strip() for line in open(tmp_path / "ptb" / "ptb.train.txt", encoding="utf-8")]
    ids = mini(" ".join(rows), return_tensors="pt").input_ids
    random.seed(3)
    expected = []
    for _ in range(6):
        i = random.randint(0, ids.shape[1] - 2048 - 1)
        expected.append(ids[0, i:i + 2048])
    assert torch.equal(get_calibration("ptb", mini, 6, 3, 2048, data_dir=str(tmp_path)), torch.stack(expected))


@needs_shared
@pytest.mark.parametrize("seqlen", [2048, 300])
def test_c4_windows_match_the_reference_draw(mini, no_datasets, seqlen):
    """Documents tokenized one by one inside the random loop, exactly as the reference does it."""
    docs = [json.loads(line)["text"] for line in gzip.open(C4_TRAIN, "rt", encoding="utf-8")]
    random.seed(0)
    expected = []
    for _ in range(6):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = mini(docs[i], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        j = random.randint(0, ids.shape[1] - seqlen - 1)
        expected.append(ids[0, j:j + seqlen])
    assert torch.equal(get_calibration("c4", mini, 6, 0, seqlen, data_dir=str(DATA)), torch.stack(expected))


@needs_shared
@pytest.mark.slow
def test_c4_windows_are_slices_of_one_document(mini, no_datasets):
    windows = get_calibration("c4", mini, 16, 7, 1024, data_dir=str(DATA))
    docs = [torch.tensor(mini(json.loads(line)["text"]).input_ids)
            for line in gzip.open(C4_TRAIN, "rt", encoding="utf-8")]

    def inside(window, doc):
        starts = torch.nonzero(doc[:len(doc) - len(window) + 1] == window[0]).flatten().tolist()
        return any(torch.equal(doc[j:j + len(window)], window) for j in starts)

    for window in windows:
        assert any(inside(window, doc) for doc in docs if len(doc) > 1024)


# ---------------------------------------------------------------------------------------------------------------
# Caches


@needs_shared
def test_disk_cache_is_read_back_and_survives_corruption(tmp_path, mini, fresh_memo, monkeypatch, no_datasets):
    data, cache = tiny_ptb(tmp_path / "data", 3000), tmp_path / "cache"
    first = get_eval_ids("ptb", mini, 64, str(data), str(cache))
    (path,) = cache.glob("ptb-eval-*.pt")

    datautils._MEMO.clear()
    with monkeypatch.context() as m:
        m.setattr(datautils, "_tokenize", lambda *_: pytest.fail("tokenized again despite the disk cache"))
        assert torch.equal(get_eval_ids("ptb", mini, 64, str(data), str(cache)), first)

    datautils._MEMO.clear()
    path.write_bytes(b"not a torch file")
    assert torch.equal(get_eval_ids("ptb", mini, 64, str(data), str(cache)), first)
    assert torch.equal(torch.load(path, weights_only=True)["ids"], first[0])  # rewritten
    assert not list(cache.glob("*.tmp"))


@needs_shared
def test_cache_key_follows_tokenizer_and_file_bytes(tmp_path, mini, opt, fresh_memo, no_datasets):
    data, cache = tiny_ptb(tmp_path / "data", 3000), tmp_path / "cache"
    a = get_eval_ids("ptb", mini, 64, str(data), str(cache))
    b = get_eval_ids("ptb", opt, 64, str(data), str(cache))
    (data / "ptb" / "ptb.test.txt").write_text(" other words entirely \n" * 200)
    c = get_eval_ids("ptb", mini, 64, str(data), str(cache))
    assert len(list(cache.glob("ptb-eval-*.pt"))) == 3
    assert not torch.equal(a, b[:, :a.shape[1]]) and not torch.equal(a[:, :c.shape[1]], c)


@needs_shared
@pytest.mark.slow
def test_cache_is_shared_with_another_process(tmp_path, mini, no_datasets):
    """The key must not depend on anything per-process (Python's str hash, object ids)."""
    data, cache = tiny_ptb(tmp_path / "data", 3000), tmp_path / "cache"
    ours = get_calibration("ptb", mini, 4, 0, 64, str(data), str(cache))
    script = (f"import sys, torch, datautils\n"
              f"from tokenizer_loading import get_tokenizer\n"
              f"datautils._tokenize = lambda *_: sys.exit('tokenized again')\n"
              f"tok = get_tokenizer({str(OPT_MINI)!r})\n"
              f"torch.save(datautils.get_calibration('ptb', tok, 4, 0, 64, {str(data)!r}, {str(cache)!r}),"
              f" {str(tmp_path / 'theirs.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], cwd=HERE, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert torch.equal(torch.load(tmp_path / "theirs.pt"), ours)


# ---------------------------------------------------------------------------------------------------------------
# The hub path, with a stand-in `datasets` that serves the local files


class FakeDataset:
    def __init__(self, field: str, rows: list[str]):
        self.field, self.rows = field, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        return self.rows if key == self.field else {self.field: self.rows[key]}  # column, row or slice


def fake_load_dataset(path, name=None, split=None, data_files=None):
    local = {("wikitext", "test"): ("wikitext2", "wikitext-2-raw/wiki.test.raw", "text"),
             ("ptb_text_only", "test"): ("ptb", "ptb/ptb.test.txt", "sentence"),
             ("allenai/c4", "train"): ("c4", C4_TRAIN.relative_to(DATA), "text"),
             ("allenai/c4", "validation"): ("c4", "c4/c4-validation.00000-of-00008.first1025.json.gz", "text")}
    dataset, relpath, field = local[path, split]
    return FakeDataset(field, datautils._read_rows(dataset, DATA / relpath, None))


@needs_shared
@pytest.mark.slow
def test_hub_path_gives_the_offline_ids(tmp_path, mini, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", fake_load_dataset, raising=False)
    for name in ("ptb", "c4"):
        assert torch.equal(get_eval_ids(name, mini, 256), get_eval_ids(name, mini, 256, data_dir=str(DATA)))
    hub = get_calibration("c4", mini, 6, 0, 2048, cache_dir=str(tmp_path))
    assert torch.equal(hub, get_calibration("c4", mini, 6, 0, 2048, data_dir=str(DATA)))
    assert list(tmp_path.glob("c4-hub-calib-*.pt"))


# ---------------------------------------------------------------------------------------------------------------
# Fast tokenizer == the slow byte-level BPE the reference ran


class SlowBPE:
    """GPT-2's byte-level BPE written out in Python, as the slow GPT2Tokenizer ran it for the reference.

    transformers 5 ignores use_fast=False (every GPT2Tokenizer is Rust-backed), so this is the slow side.
    """

    SPECIALS = ("</s>", "<unk>", "<pad>")
    WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_json: Path, merges_txt: Path):
        self.vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        pairs = [tuple(line.split()) for line in merges_txt.read_text(encoding="utf-8").splitlines()[1:] if line]
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        self.byte_char = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}
        self.bpe = lru_cache(maxsize=None)(self._bpe)
        self.word_ids = lru_cache(maxsize=None)(self._word_ids)  # a text repeats its words: each is encoded once

    def _bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            rank, k = min((self.ranks.get(pair, float("inf")), k) for k, pair in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            first, second, merged = parts[k], parts[k + 1], []
            while parts:
                if len(parts) > 1 and parts[0] == first and parts[1] == second:
                    merged.append(first + second)
                    parts = parts[2:]
                else:
                    merged.append(parts.pop(0))
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab["</s>"]]
        for piece in regex.split("(" + "|".join(map(regex.escape, self.SPECIALS)) + ")", text):
            if piece in self.SPECIALS:
                ids.append(self.vocab[piece])
                continue
            for word in self.WORD.findall(piece):
                ids.extend(self.word_ids(word))
        return ids

    def _word_ids(self, word: str) -> tuple[int, ...]:
        return tuple(self.vocab[t] for t in self.bpe("".join(self.byte_char[b] for b in word.encode())))


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", ["wikitext2", "ptb"])
def test_fast_tokenizer_matches_slow_bpe(name, opt, mini, no_datasets):
    texts = {"wikitext2": "\n\n".join("" if line == " \n" else line
                                      for line in open(DATA / "wikitext-2-raw" / "wiki.test.raw", encoding="utf-8")),
             "ptb": " ".join(line.strip() for line in open(DATA / "ptb" / "ptb.test.txt", encoding="utf-8"))}
    for tokenizer, files in ((opt, OPT_FILES), (mini, OPT_MINI)):
        slow = SlowBPE(files / "vocab.json", files / "merges.txt").encode(texts[name])
        assert get_eval_ids(name, tokenizer, 2048, data_dir=str(DATA))[0].tolist() == slow
