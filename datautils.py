"""Token ids for evaluation and calibration on WikiText-2, PTB and C4, as the SparseGPT/GPTQ scripts build them.

Which split, how rows are joined and how calibration windows are drawn follow the reference scripts exactly,
because the published perplexities depend on every id. Two things are added, and neither changes an id:
local files can stand in for the Hugging Face hub (`data_dir`, laid out like ../shared/data), and tokenized
ids are memoised in-process and cached on disk (`cache_dir`), so a second run skips tokenization.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import re
import sys
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported when a run needs it (modelutils.import_transformers)
    from transformers import PreTrainedTokenizerBase

from systems.atomic_io import atomic_file
from systems.progress import libraries_quiet

DATASETS = ("wikitext2", "ptb", "c4")

_LAYOUT = "wikitext-2-raw/, ptb/, c4/ as in ../shared/data"
_CACHE_VERSION = 2  # bump when a join rule or the cache format changes (2: entries carry a checksum)

# (dataset, split) -> file under data_dir; C4 shards may also be a first-N-documents subset (`.first1041.json.gz`).
_LOCAL = {
    ("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw",
    ("wikitext2", "train"): "wikitext-2-raw/wiki.train.raw",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("ptb", "train"): "ptb/ptb.train.txt",
    ("c4", "validation"): "c4/c4-validation.00000-of-00008.json.gz",
    ("c4", "train"): "c4/c4-train.00000-of-01024.json.gz",
}
# The raw WikiText-2 train split is not in ../shared; its tokenized validation split is the calibration stand-in.
_WIKITEXT2_FALLBACK = "wikitext-2/wiki.valid.tokens"

# (dataset, split) -> (load_dataset kwargs, text field), as the reference calls it.
_HUB = {
    ("wikitext2", "test"): (dict(path="wikitext", name="wikitext-2-raw-v1", split="test"), "text"),
    ("wikitext2", "train"): (dict(path="wikitext", name="wikitext-2-raw-v1", split="train"), "text"),
    ("ptb", "test"): (dict(path="ptb_text_only", name="penn_treebank", split="test"), "sentence"),
    ("ptb", "train"): (dict(path="ptb_text_only", name="penn_treebank", split="train"), "sentence"),
    ("c4", "validation"): (dict(path="allenai/c4", split="validation",
                                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}), "text"),
    ("c4", "train"): (dict(path="allenai/c4", split="train",
                           data_files={"train": "en/c4-train.00000-of-01024.json.gz"}), "text"),
}

# Evaluation text: dataset -> (split, separator the rows are joined with).
_EVAL = {"wikitext2": ("test", "\n\n"), "ptb": ("test", " "), "c4": ("validation", " ")}
_C4_EVAL_DOCS = 1100  # the reference joins the first 1100 validation documents...
_C4_EVAL_WINDOWS = 256  # ...and keeps the first 256 * seqlen ids


class DataError(ValueError):
    """A data problem the user can fix; the message is one line that names the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Where the rows come from


@dataclass(frozen=True)
class Source:
    """One split of one dataset: a local file, or the hub when `path` is None."""
    name: str
    split: str
    path: Path | None = None

    def fingerprint(self) -> str:
        """What the rows depend on: the file's bytes, or the hub dataset id and split."""
        if self.path is None:
            return json.dumps(_HUB[self.name, self.split], sort_keys=True)
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def rows(self, limit: int | None = None) -> list[str]:
        """The first `limit` rows (all if None), exactly as the hub dataset gives them."""
        if self.path is not None:
            return _read_rows(self.name, self.path, limit)
        field = _HUB[self.name, self.split][1]
        dataset = _hub_dataset(self.name, self.split)
        return list(dataset[field] if limit is None else dataset[:limit][field])


def _read_rows(name: str, path: Path, limit: int | None) -> list[str]:
    """Rows of a local file under the hub's rules (../shared/README.md); DataError naming the file (and line)
    if it cannot be decompressed, decoded as UTF-8 or parsed."""
    if name == "c4":
        rows = []
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for number, line in enumerate(itertools.islice(f, limit), 1):
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError, IndexError) as e:
                        raise DataError(f"{path} line {number}: expected a JSON object with a \"text\" field "
                                        f"({type(e).__name__}); replace the file with a C4 shard") from None
                    if not isinstance(text, str):
                        raise DataError(f"{path} line {number}: \"text\" is not a string; replace the file with a "
                                        f"C4 shard")
                    rows.append(text)
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:  # truncated or corrupt gzip, bad UTF-8
            raise DataError(f"cannot read {path} ({type(e).__name__}: {str(e)[:100]}): expected gzip-compressed "
                            f"UTF-8 JSON lines; the file is damaged, replace it") from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = list(itertools.islice(f, limit))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); replace it with the real "
                            f"{name} file") from None
        # PTB rows are stripped sentences; WikiText keeps the newline, and a " \n" line is the empty row.
        rows = [line.strip() for line in lines] if name == "ptb" else ["" if line == " \n" else line for line in lines]
    if not rows:
        raise DataError(f"{path} has no rows: replace it with the real {name} file (--data_dir layout: {_LAYOUT})")
    return rows


def _hub_dataset(name: str, split: str):
    """`datasets.load_dataset` as the reference calls it; imported here so the offline path never needs it."""
    kwargs, _ = _HUB[name, split]
    try:
        import datasets
    except ImportError:
        raise DataError(f"the `datasets` package is not installed, so {name} cannot come from the hub; "
                        f"pass --data_dir DIR with {_LAYOUT}") from None
    try:
        with _quiet_datasets(datasets, libraries_quiet()):
            return datasets.load_dataset(**kwargs)
    except Exception as e:  # offline, unknown dataset, auth, cache: each is fixed the same way
        raise DataError(f"cannot load {kwargs['path']} ({split}) from the Hugging Face hub ({type(e).__name__}); "
                        f"pass --data_dir DIR with {_LAYOUT}") from e


@contextmanager
def _quiet_datasets(datasets, quiet: bool):
    """Under --quiet (runtime.quiet_libraries), datasets' download and preparation bars and its log lines below
    errors are off while the block runs, and come back as they were."""
    if not quiet:
        yield
        return
    bars, level = datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        if not bars:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(level)


def _find(data_dir: str | os.PathLike, relpath: str) -> Path | None:
    """The file `relpath` under data_dir; for a C4 shard, the full shard or one first-N subset of it. Two
    candidates for one role are a DataError that lists them: which one is read changes every perplexity."""
    path = Path(data_dir) / relpath
    if not relpath.endswith(".json.gz"):
        return path if path.is_file() else None
    shards = sorted(p for p in path.parent.glob(path.name.removesuffix(".json.gz") + "*.json.gz") if p.is_file())
    if len(shards) > 1:
        raise DataError(f"{len(shards)} candidate files for {relpath} in {path.parent}: "
                        f"{', '.join(p.name for p in shards)}; keep exactly one (move the others out of --data_dir)")
    return shards[0] if shards else None


def _source(name: str, split: str, data_dir: str | os.PathLike | None, quiet: bool = False) -> Source:
    """Resolve a split to the hub (data_dir None) or a local file, raising DataError if the file is missing."""
    if data_dir is None:
        return Source(name, split)
    path = _find(data_dir, _LOCAL[name, split])
    if path is None and (name, split) == ("wikitext2", "train"):
        path = _find(data_dir, _WIKITEXT2_FALLBACK)
        if path is not None and not quiet:
            print(f"wikitext2: raw WikiText-2 train split missing ({Path(data_dir) / _LOCAL[name, split]}); "
                  f"calibrating on {path} instead", file=sys.stderr)
    if path is None:
        expected = Path(data_dir) / _LOCAL[name, split]
        subset = " (or a .firstN subset of it)" if expected.name.endswith(".json.gz") else ""
        raise DataError(f"missing {expected}{subset}: --data_dir must hold {_LAYOUT}")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path} (permission denied): make it readable (chmod a+r) or copy the data "
                        f"into a directory of yours")
    return Source(name, split, path)


def check_sources(calibration: str, evaluation: list[str], data_dir: str | os.PathLike | None) -> None:
    """Raise DataError now for an unknown dataset or a missing local file, before any long work starts."""
    for name in (calibration, *evaluation):
        _check_name(name)
    _source(calibration, "train", data_dir, quiet=True)
    for name in evaluation:
        _source(name, _EVAL[name][0], data_dir)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenized ids, memoised in-process and cached on disk

_MEMO: dict[str, list[torch.Tensor]] = {}


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of all that decides the ids: for a Rust tokenizer its serialisation (vocab, merges, BOS template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{spec}".encode()).hexdigest()


def _cache_key(protocol: str, tokenizer: PreTrainedTokenizerBase, source: Source, *extra) -> str:
    parts = [_CACHE_VERSION, protocol, _tokenizer_fingerprint(tokenizer), source.fingerprint(), *extra]
    return f"{protocol}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]}"


def _cached(key: str, cache_dir: str | os.PathLike | None, compute: Callable[[], list[torch.Tensor]],
            vocab: int | None = None) -> list[torch.Tensor]:
    """A list of 1-D id tensors from the memo, else `cache_dir/<key>.pt`, else `compute()` (then stored in both).
    A cache entry that fails its checks (checksum, shape, ids below `vocab`) is reported and rebuilt."""
    if key in _MEMO:
        return _MEMO[key]
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
    seqs = _load(path, vocab) if path is not None else None
    if seqs is None:
        seqs = compute()
        if path is not None:
            _save(path, seqs)
    _MEMO[key] = seqs
    return seqs


def _checksum(ids: torch.Tensor, lengths: torch.Tensor) -> str:
    digest = hashlib.sha256(ids.contiguous().numpy().tobytes())
    digest.update(lengths.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load(path: Path, vocab: int | None = None) -> list[torch.Tensor] | None:
    """The cached sequences, or None if the file is absent or fails a check (it is then recomputed and
    rewritten): unreadable, not the format _save writes, a checksum that does not match its ids (a flipped
    byte), or an id outside the tokenizer's vocabulary."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        ids, lengths = blob["ids"], blob["lengths"]
        problem = None
        if not (ids.dtype == torch.int64 and ids.dim() == 1 and lengths.dtype == torch.int64 and lengths.dim() == 1
                and (lengths >= 0).all() and int(lengths.sum()) == ids.numel()):
            problem = "shapes or types do not match"
        elif blob.get("sha256") != _checksum(ids, lengths):
            problem = "checksum mismatch"
        elif ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            problem = f"token ids outside the vocabulary of {vocab}"
    except Exception as e:
        problem = f"unreadable ({type(e).__name__})"
    if problem is not None:
        print(f"warning: cache entry {path} is damaged ({problem}); rebuilding it", file=sys.stderr)
        return None
    return list(torch.split(ids, lengths.tolist()))


def _save(path: Path, seqs: list[torch.Tensor]) -> None:
    """Write atomically, so a concurrent or killed run never leaves a half-written file under the final name.
    A cache that cannot be written (a directory in the way, no space) is a warning: the run goes on."""
    try:
        ids = torch.cat(seqs)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        with atomic_file(path) as tmp:
            torch.save({"ids": ids, "lengths": lengths, "sha256": _checksum(ids, lengths)}, tmp)
    except OSError as e:
        print(f"warning: cannot write the cache entry {path} ({type(e).__name__}: {e.strerror or e}); "
              f"continuing without it", file=sys.stderr)


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[torch.Tensor]:
    """Each text on its own (BOS included); one batched call so a fast tokenizer uses every core."""
    return [torch.tensor(ids, dtype=torch.int64) for ids in tokenizer(texts)["input_ids"]]


# A space or newline that ends a whitespace run and precedes a letter or digit.
_CUT = re.compile(r"[ \n](?=[A-Za-z0-9])")
_PIECE_CHARS = 32768


def tokenize_long(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The ids of one long text, as `tokenizer(text)` gives them, but encoded in pieces on every core.

    A Rust tokenizer encodes one string on one thread: the evaluation texts (1-2 M characters)
    took seconds. GPT-2/OPT byte-level BPE first splits text with a regex whose tokens never
    cross the point just before the last character of a whitespace run that precedes a letter or
    digit (the run minus that character is one token, that character starts the next word), so
    cutting there gives the same ids; test_datautils checks it on the real files. Other
    tokenizers (prefix spaces, normalizers) are encoded whole.
    """
    prefix = _special_prefix(tokenizer)
    if prefix is None or len(text) <= _PIECE_CHARS:
        return _tokenize(tokenizer, [text])[0]
    cuts = [0]
    for k in range(1, -(-len(text) // _PIECE_CHARS)):
        found = _CUT.search(text, max(cuts[-1] + 1, k * _PIECE_CHARS))
        if found is None:
            break
        cuts.append(found.start())
    cuts.append(len(text))
    pieces = tokenizer([text[a:b] for a, b in zip(cuts, cuts[1:])], add_special_tokens=False)["input_ids"]
    return torch.tensor(prefix + [i for ids in pieces for i in ids], dtype=torch.int64)


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The special ids a byte-level BPE tokenizer puts before a text (OPT: `</s>`), or None if the
    tokenizer is not one whose pieces can be encoded separately (see tokenize_long)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex")) != ("ByteLevel", False, True) \
            or spec.get("normalizer") is not None:
        return None
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if full[len(full) - len(plain):] != plain:
        return None  # specials after the text: pieces cannot simply be concatenated
    return full[:len(full) - len(plain)]


# ---------------------------------------------------------------------------------------------------------------
# The reference protocol


def get_eval_ids(name: str, tokenizer: PreTrainedTokenizerBase, seqlen: int,
                 data_dir: str | None = None, cache_dir: str | None = None) -> torch.Tensor:
    """(1, N) int64 ids of the evaluation text, tokenized as one string so `</s>` leads once, as in the reference.

    WikiText-2: test rows joined with "\\n\\n"; PTB: test sentences joined with " "; C4: the first 1100 validation
    documents joined with " ", cut to 256 * seqlen ids (the offline subset has only 1025: all are used).
    """
    _check_name(name)
    split, sep = _EVAL[name]
    source = _source(name, split, data_dir)
    limit = _C4_EVAL_DOCS if name == "c4" else None
    (ids,) = _cached(_cache_key(f"{name}-eval", tokenizer, source), cache_dir,
                     lambda: [tokenize_long(tokenizer, sep.join(source.rows(limit)))], len(tokenizer))
    if name == "c4":
        ids = ids[:_C4_EVAL_WINDOWS * seqlen]
    if len(ids) < seqlen:
        raise DataError(f"{name} evaluation text has {len(ids)} tokens; one window of seqlen {seqlen} needs "
                        f"at least {seqlen}: use a shorter seqlen or a longer {source.path or 'split'}")
    return ids[None].clone()  # callers may write into it; the memo must not change


def get_calibration(name: str, tokenizer: PreTrainedTokenizerBase, nsamples: int, seed: int, seqlen: int,
                    data_dir: str | None = None, cache_dir: str | None = None) -> torch.Tensor:
    """(nsamples, seqlen) int64 calibration windows, drawn exactly as the reference draws them.

    WikiText-2 and PTB: train rows joined with " ", tokenized once, windows at uniform random starts.
    C4: per sample, random train documents until one is longer than seqlen, then a random window in it.
    A private `random.Random(seed)` gives the same draws as the reference's global `random.seed(seed)`.
    """
    _check_name(name)
    rng = random.Random(seed)
    source = _source(name, "train", data_dir)
    if name != "c4":
        (ids,) = _cached(_cache_key(f"{name}-calib", tokenizer, source), cache_dir,
                         lambda: [tokenize_long(tokenizer, " ".join(source.rows()))], len(tokenizer))
        return _text_windows(ids, rng, nsamples, seqlen, f"{name} calibration text ({source.path or 'hub'})")
    if data_dir is not None:  # ~1k documents: tokenize them all at once, then the draw is cheap
        docs = _cached(_cache_key("c4-calib", tokenizer, source), cache_dir,
                       lambda: _tokenize(tokenizer, source.rows()), len(tokenizer))
        return _doc_windows(docs, rng, nsamples, seqlen)
    # The hub shard has 356k documents and the draw reads a few thousand: tokenize those lazily, cache the windows.
    windows = _cached(_cache_key("c4-hub-calib", tokenizer, source, nsamples, seed, seqlen), cache_dir,
                      lambda: list(_doc_windows(_LazyDocs(_hub_dataset("c4", "train"), tokenizer),
                                                rng, nsamples, seqlen)), len(tokenizer))
    return torch.stack(windows)


def _text_windows(ids: torch.Tensor, rng: random.Random, nsamples: int, seqlen: int, what: str) -> torch.Tensor:
    if len(ids) < seqlen + 1:
        raise DataError(f"{what} has {len(ids)} tokens; seqlen {seqlen} needs at least {seqlen + 1}: "
                        f"use a shorter seqlen or more text")
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


def _doc_windows(docs: Sequence[torch.Tensor], rng: random.Random, nsamples: int, seqlen: int) -> torch.Tensor:
    # The reference accepts a document of >= seqlen ids, then crashes drawing a start in one of exactly seqlen;
    # `>` gives the same windows on every run that worked.
    windows, rejected, longest = [], set(), 0
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            doc = docs[i]
            if len(doc) > seqlen:
                break
            rejected.add(i)
            longest = max(longest, len(doc))
            if len(rejected) == len(docs):
                raise DataError(f"no C4 training document is longer than seqlen {seqlen} (longest of {len(docs)}: "
                                f"{longest} tokens); need one of at least {seqlen + 1}: use a shorter seqlen "
                                f"or more documents")
        j = rng.randint(0, len(doc) - seqlen - 1)
        windows.append(doc[j:j + seqlen])
    return torch.stack(windows)


class _LazyDocs(Sequence):
    """Hub C4 train documents, each tokenized (BOS included) on first access and kept."""

    def __init__(self, dataset, tokenizer: PreTrainedTokenizerBase):
        self.dataset, self.tokenizer, self.ids = dataset, tokenizer, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.ids:
            self.ids[i] = _tokenize(self.tokenizer, [self.dataset[i]["text"]])[0]
        return self.ids[i]
