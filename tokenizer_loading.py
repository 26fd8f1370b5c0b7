"""A model's tokenizer, loaded as every run and tool here loads it (`get_tokenizer`), and, when it cannot be, the
one-line reason that names the real cause (`tokenizer_failure`): missing files, or a missing package.
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from datautils import DataError
from modelutils import import_transformers, model_source

if TYPE_CHECKING:  # transformers is imported when a run needs it (modelutils.import_transformers)
    from transformers import PreTrainedTokenizerBase


def get_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The model's fast (Rust) tokenizer: the same ids as the slow one the reference used, many times faster.
    FileNotFoundError for a local path that is not a model directory (modelutils.model_source); DataError if
    it cannot be loaded or encodes text to nothing (its files missing)."""
    import_transformers()  # without scikit-learn, as a run imports it (AutoTokenizer pulls in generation)
    from transformers import AutoTokenizer
    from transformers.utils import logging

    source = model_source(model)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its notes on the way to a failure (a package missing) come before our one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as e:  # OSError (offline, unknown id), or a damaged tokenizer file (ValueError, JSON errors)
        raise DataError(tokenizer_failure(model, source, e)) from e
    finally:
        logging.set_verbosity(verbosity)
    if not tokenizer("the cat", add_special_tokens=False)["input_ids"]:
        raise DataError(f"the tokenizer of {model} encodes text to nothing: its files (tokenizer.json, or vocab.json "
                        f"and merges.txt) are missing from {model}; copy them from the model it was trained with")
    return tokenizer


# The files a tokenizer is read from: the tokenizers library's own serialization, a SentencePiece or tiktoken model
# (converted on loading), a byte-level BPE's vocabulary and merges, a WordPiece vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "merges.txt", "vocab.txt")


def installed(package: str) -> bool:
    """Whether `package` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def tokenizer_failure(model: str, source: str, error: BaseException) -> str:
    """The one-line message for a tokenizer that transformers could not load, naming the real cause where the files
    show it: no tokenizer file at all (transformers then asks for sentencepiece or tiktoken, which would not help), or
    a SentencePiece/tiktoken model without tokenizer.json, which needs a package that is not installed."""
    detail = " ".join(str(error).split())[:150]
    if os.path.isdir(source):
        files = set(os.listdir(source))
        tiktoken_files = sorted(f for f in files if f.endswith(".tiktoken"))
        if not files & set(TOKENIZER_FILES) and not tiktoken_files:
            return (f"the tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json and merges.txt) are "
                    f"missing from {model}; copy them from the model it was trained with")
        if "tokenizer.json" not in files:
            model_file = "tokenizer.model" if "tokenizer.model" in files else (tiktoken_files or [None])[0]
            chain, e = [], error
            while e is not None:
                chain.append(str(e))
                e = e.__cause__ or e.__context__
            text = " ".join(chain).lower()
            if (model_file is not None and model_file.endswith(".tiktoken")) or \
                    ("tiktoken" in text and installed("sentencepiece")):
                needed = ["tiktoken"]
            else:
                needed = ["sentencepiece", "protobuf"] if "protobuf" in text else ["sentencepiece"]
            missing = [p for p in needed if not installed("google.protobuf" if p == "protobuf" else p)]
            if model_file is not None and missing:
                return (f"the tokenizer of {model} is {model_file} without tokenizer.json, and reading it needs "
                        f"{' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                        f"pip install {' '.join(missing)} (or add the model's tokenizer.json)")
    return (f"cannot load a tokenizer from {model!r} ({type(error).__name__}: {detail}); pass a local model directory "
            f"(e.g. ../shared/models/opt-mini) or a hub id reachable from here")
