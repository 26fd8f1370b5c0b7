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
from typing import Any

import torch.nn as nn


def available() -> bool:
    """Whether lm-eval and accelerate are installed (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("lm_eval", "accelerate"))


@functools.cache
def task_manager(include: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index for `tasks`: the local definitions alone when they hold every task (indexing
    lm-eval's own ~15,000 definitions takes seconds), else those and lm-eval's."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include) if include else TaskManager()


def unknown_tasks(tasks: list[str], include: str | None) -> list[str]:
    """The names among `tasks` that lm-eval (with the included definitions) does not know."""
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
