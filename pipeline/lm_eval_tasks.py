"""lm-evaluation-harness on the compressed model, in the same process (`--lm_eval TASKS`).

lm-eval (an optional dependency, with accelerate, which its Hugging Face wrapper imports) scores the model
object the run just compressed, so nothing is saved and reloaded in between. Tasks are lm-eval's by name,
or local task definitions (YAML files) from `--lm_eval_include DIR`; offline, a task must read its data
from local files (`dataset_path: json` with `data_files`), since the hub cannot be reached.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import torch.nn as nn


def available() -> bool:
    """Whether lm-eval and accelerate are installed (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("lm_eval", "accelerate"))


@functools.cache
def _index(include: str | None, defaults: bool):
    """lm-eval's TaskManager over the definitions in `include`, and lm-eval's own if `defaults`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def task_manager(include: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index for `tasks`: the local definitions alone when they hold every task (indexing
    lm-eval's own ~15,000 definitions takes seconds), else those and lm-eval's."""
    if include and set(tasks) <= set(_index(include, False).all_tasks):
        return _index(include, False)
    return _index(include, True)


def written_in_lm_eval(names: list[str]) -> set[str]:
    """The names among `names` that occur in some file of lm-eval's own task directory.

    Every task, group and tag lm-eval defines is spelled out there, in a YAML definition or in a file
    one includes (some of those are not *.yaml), so a name found in no file is not lm-eval's. Reading
    the files (~15,000, 12 MB) takes a fraction of a second; lm-eval's index parses them all (seconds).
    """
    spec = importlib.util.find_spec("lm_eval")  # its location, without importing it
    left = {name: name.encode() for name in names}
    found: set[str] = set()
    for directory, subdirs, files in os.walk(os.path.join(spec.submodule_search_locations[0], "tasks")):
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        for file in files:
            with open(os.path.join(directory, file), "rb") as f:
                text = f.read()
            for name, spelled in list(left.items()):
                if spelled in text:
                    found.add(name)
                    del left[name]
            if not left:
                return found
    return found


def unknown_tasks(tasks: list[str], include: str | None) -> list[str]:
    """The names among `tasks` that lm-eval (with the included definitions) does not know.

    A name that is neither an included task nor written anywhere in lm-eval's task directory is unknown
    without lm-eval's index: when there are such names, only they are returned (a typo is reported at
    once rather than after seconds of indexing). Otherwise the index decides for every name.
    """
    local = set(_index(include, False).all_tasks) if include else set()
    elsewhere = [t for t in tasks if t not in local]
    written = written_in_lm_eval(elsewhere) if elsewhere else set()
    if any(t not in written for t in elsewhere):
        return [t for t in elsewhere if t not in written]
    known = set(task_manager(include, tuple(tasks)).all_tasks)
    return [t for t in tasks if t not in known]


def evaluate(model: nn.Module, tokenizer, tasks: list[str], include: str | None, batch_size: int,
             device: str) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task results for `model` (which must sit on `device` whole), JSON-safe: a metric that
    lm-eval could not compute (its stderr on one sample, say) becomes None rather than NaN."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(include, tuple(tasks)), log_samples=False)
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    return {task: {k: clean(v) for k, v in metrics.items()} for task, metrics in out["results"].items()}
