"""lm-evaluation-harness on the compressed model, in the same process (`--lm_eval TASKS`).

lm-eval (an optional dependency, with accelerate, which its Hugging Face wrapper imports) scores the model
object the run just compressed, so nothing is saved and reloaded in between. Tasks are lm-eval's by name,
or local task definitions (YAML files) from `--lm_eval_include DIR`; offline, a task must read its data
from local files (`dataset_path: json` with `data_files`), since the hub cannot be reached. One task ships
with the tool and works offline out of the box: `wikitext2_local` (BUNDLED), lm-eval's `wikitext` metrics on the
WikiText-2 test articles of `--data_dir`.

Everything that can be checked before the run is (`unknown_tasks`, `check_sources`): task names, YAML that does not
parse, local data files, the hub for tasks that read it.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn


def available() -> bool:
    """Whether lm-eval and accelerate are installed (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("lm_eval", "accelerate"))


@functools.cache
def _index(include: str | tuple[str, ...] | None, defaults: bool):
    """lm-eval's TaskManager over the definitions in `include` (a directory, or several: later ones override earlier
    ones), and lm-eval's own if `defaults`."""
    from lm_eval.tasks import TaskManager

    paths = list(include) if isinstance(include, tuple) else include
    return TaskManager(include_path=paths, include_defaults=defaults)


def task_manager(include: str | None, tasks: tuple[str, ...]):
    """lm-eval's task index for `tasks` (bundled ones aside): the local definitions alone when they hold every task
    (indexing lm-eval's own ~15,000 definitions takes seconds), else those and lm-eval's."""
    tasks = tuple(t for t in tasks if t not in BUNDLED)
    if set(tasks) <= (set(_index(include, False).all_tasks) if include else set()):
        return _index(include, False)
    return _index(include, True)


def targeted_index(include: str | None, tasks: tuple[str, ...]):
    """An index that knows `tasks` as lm-eval's whole one would, built from the directories of lm-eval's task files
    that spell out their names (`directories_mentioning`) and `include`, for the checks before a run: lm-eval's
    whole index parses ~15,000 definitions (seconds; 38 s on a busy 2-core machine), these a few. Every definition
    of a task, group or tag names it, and a file that others include sits beside them, so the directories hold
    all of it; the groups' and tags' members found missing are looked up the same way until none is."""
    tasks = tuple(t for t in tasks if t not in BUNDLED)
    local = set(_index(include, False).all_tasks) if include else set()
    wanted, looked, directories = {t for t in tasks if t not in local}, set(), set()
    manager = _index(include, False) if include else None
    while wanted - looked:
        directories |= directories_mentioning(sorted(wanted - looked))
        looked |= wanted
        with silenced(True):  # lm-eval's notes on the user's tasks overriding its own
            manager = _index(outermost(directories) + ((include,) if include else ()), False)
        wanted |= set(leaf_tasks(manager, list(tasks))[1])
    return manager if manager is not None else _index(include, False)


# ---------------------------------------------------------------- the bundled task


# ---------------------------------------------------------------- the bundled task


BUNDLED_EXAMPLE = "wikitext2_local"
WIKITEXT2_TEST = os.path.join("wikitext-2-raw", "wiki.test.raw")  # under --data_dir (datautils' layout)


def wikitext2_articles(path: str) -> list[str]:
    """The articles of a raw WikiText-2 file: its text cut before each top-level heading (a line ` = Title = `;
    second-level headings read ` = = Section = = `), each article its heading and lines as they stand. Text
    before the first heading (a file without headings) is an article of its own."""
    articles: list[list[str]] = [[]]
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if text.startswith("= ") and text.endswith(" =") and not text.startswith("= ="):
                articles.append([])
            articles[-1].append(line)
    return ["".join(lines) for lines in articles if "".join(lines).strip()]


def wikitext2_task(data_dir: str) -> dict[str, Any]:
    """`wikitext2_local` as an lm-eval task config: lm-eval's `wikitext` task (its detokenizer, its word and byte
    perplexities and bits per byte, each article scored whole by rolling windows) on the WikiText-2 test articles of
    `data_dir`, the same file the run's own WikiText-2 perplexity reads, built in memory: no hub, no file written.
    lm-eval's `wikitext` reads the hub's document-level copy of the same split."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    path = os.path.join(data_dir, WIKITEXT2_TEST)

    def articles(**_: Any):
        import datasets

        pages = [{"page": a} for a in wikitext2_articles(path)]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(pages)})

    return {"task": BUNDLED_EXAMPLE, "custom_dataset": articles, "output_type": "loglikelihood_rolling",
            "test_split": "test", "doc_to_text": "", "doc_to_target": wikitext_detokenizer,
            "process_results": process_results,
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": 1.0}}


# The tasks that ship with the tool: name -> its config, from --data_dir.
BUNDLED = {BUNDLED_EXAMPLE: wikitext2_task}


@functools.cache
def lm_eval_task_files() -> tuple[tuple[str, bytes], ...]:
    """(directory, contents) of every file in lm-eval's own task directory (~15,000, 12 MB), read once."""
    spec = importlib.util.find_spec("lm_eval")  # its location, without importing it
    files = []
    for directory, subdirs, names in os.walk(os.path.join(spec.submodule_search_locations[0], "tasks")):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for name in sorted(names):
            with open(os.path.join(directory, name), "rb") as f:
                files.append((directory, f.read()))
    return tuple(files)


def written_in_lm_eval(names: list[str]) -> set[str]:
    """The names among `names` that occur in some file of lm-eval's own task directory.

    Every task, group and tag lm-eval defines is spelled out there, in a YAML definition or in a file
    one includes (some of those are not *.yaml), so a name found in no file is not lm-eval's. Reading
    the files (~15,000, 12 MB) takes a fraction of a second; lm-eval's index parses them all (seconds).
    """
    spelled = {name: name.encode() for name in names}
    return {name for name, b in spelled.items() if any(b in text for _, text in lm_eval_task_files())}


def directories_mentioning(names: list[str]) -> set[str]:
    """The directories of lm-eval's task files that spell out any of `names`."""
    spelled = [name.encode() for name in names]
    return {directory for directory, text in lm_eval_task_files() if any(b in text for b in spelled)}


def outermost(directories: set[str]) -> tuple[str, ...]:
    """`directories` without those inside another of them (an index walks each one's subdirectories: a nested one
    would be indexed twice, each of its tasks then "overriding" itself)."""
    kept: list[str] = []
    for d in sorted(directories):  # a parent sorts before its children
        if not kept or not d.startswith(kept[-1].rstrip(os.sep) + os.sep):
            kept.append(d)
    return tuple(kept)


def unknown_tasks(tasks: list[str], include: str | None) -> list[str]:
    """The names among `tasks` that lm-eval (with the included definitions) does not know.

    A name that is neither an included task nor written anywhere in lm-eval's task directory is unknown
    without lm-eval's index: when there are such names, only they are returned (a typo is reported at
    once rather than after seconds of indexing). Otherwise the index decides for every name.
    """
    tasks = [t for t in tasks if t not in BUNDLED]
    if not tasks:
        return []
    local = set(_index(include, False).all_tasks) if include else set()
    elsewhere = [t for t in tasks if t not in local]
    written = written_in_lm_eval(elsewhere) if elsewhere else set()
    if any(t not in written for t in elsewhere):
        unknown = [t for t in elsewhere if t not in written]
    else:
        known = set(targeted_index(include, tuple(tasks)).all_tasks)
        unknown = [t for t in tasks if t not in known]
    problems = yaml_problems(include) if unknown and include else []
    if problems:  # the likely reason: lm-eval skipped the file that defines it
        from datautils import DataError

        path, what = problems[0]
        raise DataError(f"--lm_eval {', '.join(unknown)}: not defined, and the task definition {path} does not parse "
                        f"({what}); fix the YAML")
    return unknown


def yaml_problems(include: str) -> list[tuple[str, str]]:
    """(file, what is wrong) for each task definition under `include` (*.yaml, as lm-eval walks it, and the files
    they `include:`) that does not parse as a YAML mapping. lm-eval's index skips such a file without a word, so a
    task it defines would otherwise be reported as unknown. `!function` and other tags are taken as plain values:
    only the YAML itself is checked here."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    problems: list[tuple[str, str]] = []
    pending = sorted(str(p) for p in Path(include).glob("**/*.yaml")
                     if not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts))
    seen: set[str] = set()
    while pending:
        path = os.path.abspath(pending.pop(0))
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path, "rb") as f:
                config = yaml.load(f, Loader=Loader)  # noqa: S506 (a SafeLoader)
        except OSError as e:
            problems.append((path, f"cannot be read: {e.strerror}"))
            continue
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problems.append((path, f"{where}{getattr(e, 'problem', None) or e}"))
            continue
        if not isinstance(config, dict):
            problems.append((path, f"holds a {type(config).__name__}, not a mapping of task settings"))
            continue
        includes = config.get("include") or []
        for name in includes if isinstance(includes, list) else [includes]:
            if isinstance(name, str):
                pending.append(name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name))
    return problems


# The `dataset_path`s that datasets builds from local files (`dataset_kwargs: {data_files: ...}`), without the hub.
LOCAL_BUILDERS = ("json", "csv", "text", "parquet", "arrow", "pandas")


def leaf_tasks(manager, names: list[str]) -> tuple[list[tuple[str, dict[str, Any], str | None]], list[str]]:
    """(task, its settings, its YAML file) of every task that `names` (tasks, groups, tags) run, from lm-eval's index
    (the parsed YAML; nothing is built, no data is read), and the names the index lacks. A group's entry that names
    a task with settings of its own overrides that task's."""
    index = manager.task_index
    found: list[tuple[str, dict[str, Any], str | None]] = []
    missing: list[str] = []
    seen: set[str] = set()

    def walk(item: Any, overrides: dict[str, Any]) -> None:
        if isinstance(item, dict):
            name = item.get("task")
            if isinstance(name, str) and name in index:
                walk(name, {k: v for k, v in item.items() if k != "task"})
            elif isinstance(item.get("group"), str):
                for sub in item.get("task") or []:
                    walk(sub, {})
            elif isinstance(name, str):  # a task defined inline in its group
                found.append((name, item, None))
            return
        entry = index.get(item) if isinstance(item, str) else None
        if entry is None and isinstance(item, str) and item not in missing:
            missing.append(item)
        if entry is None or item in seen:
            return
        seen.add(item)
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK"):
            found.append((item, {**(entry.cfg or {}), **overrides}, str(entry.yaml_path) if entry.yaml_path else None))
        elif kind == "GROUP":
            for sub in (entry.cfg or {}).get("task") or []:
                walk(sub, {})
        elif kind == "TAG":
            for sub in sorted(entry.tags):
                walk(sub, {})

    for name in names:
        walk(name, {})
    return found, missing


def data_files(spec: Any) -> list[str]:
    """The paths (or glob patterns) of a `dataset_kwargs.data_files` entry: a path, a list, or splits to either."""
    if isinstance(spec, str):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [p for item in spec for p in data_files(item)]
    if isinstance(spec, dict):
        return [p for item in spec.values() for p in data_files(item)]
    return []


def hub_cached(dataset: str) -> bool:
    """Whether a hub dataset has a copy in datasets' cache or the hub's (where datasets offline reads it)."""
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    datasets_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(home, "datasets"))
    hub_cache = os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))
    return os.path.isdir(os.path.join(datasets_cache, dataset.replace("/", "___"))) or \
        os.path.isdir(os.path.join(hub_cache, "datasets--" + dataset.replace("/", "--")))


def check_sources(tasks: list[str], include: str | None, data_dir: str | None) -> None:
    """DataError (one line, before any work) for a task whose data the run could not read when it got to lm-eval,
    after compressing and evaluating: a local data file (`dataset_path: json` with `data_files`) that does not
    exist, or a hub dataset when the hub cannot be reached (or is switched off) and no cached copy is here.
    Relative data files are found from the working directory, as datasets finds them. Tasks defined in Python,
    whose data lm-eval knows only once it builds them, pass. A bundled task needs its file under `data_dir`."""
    from datautils import DataError
    from modelutils import hub_reachable

    for task in (t for t in tasks if t in BUNDLED):
        if data_dir is None:
            raise DataError(f"--lm_eval {task} reads {WIKITEXT2_TEST} under --data_dir: add --data_dir DIR (the "
                            f"offline data, e.g. ../shared/data)")
        if not os.path.isfile(os.path.join(data_dir, WIKITEXT2_TEST)):
            raise DataError(f"--lm_eval {task} reads {os.path.join(data_dir, WIKITEXT2_TEST)}, which does not exist; "
                            f"give the --data_dir that holds it")
    others = [t for t in tasks if t not in BUNDLED]
    hub: list[tuple[str, str]] = []
    leaves = leaf_tasks(targeted_index(include, tuple(others)), others)[0] if others else []
    for task, config, yaml_path in leaves:
        path, kwargs = config.get("dataset_path"), config.get("dataset_kwargs") or {}
        where = f" ({yaml_path})" if yaml_path else ""
        if not isinstance(path, str):
            continue
        if path in LOCAL_BUILDERS:
            for pattern in data_files(kwargs.get("data_files") if isinstance(kwargs, dict) else None):
                if not glob.glob(os.path.expanduser(pattern), recursive=True):
                    raise DataError(f"--lm_eval task {task}{where}: its data file {pattern} does not exist (relative "
                                    f"paths start at the working directory, {os.getcwd()}); fix data_files or "
                                    f"create the file")
        elif not os.path.isdir(os.path.expanduser(path)):
            hub.append((task, path))
    missing = [(task, path) for task, path in hub if not hub_cached(path)]
    if missing and not hub_reachable():
        task, path = missing[0]
        why = "is switched off (HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE", "0").lower() in \
            ("1", "true", "yes", "on") else "cannot be reached"
        raise DataError(f"--lm_eval task {task} reads its data ({path}) from the Hugging Face hub, which {why}, and "
                        f"no copy is cached here: run it where the hub answers, or use a local task (--lm_eval "
                        f"{BUNDLED_EXAMPLE} with --data_dir, or --lm_eval_include DIR)")


@dataclass(frozen=True)
class TaskRun:
    """What --lm_eval asks for: the tasks, a directory of local task definitions, windows per forward pass, where
    the bundled tasks read their data (--data_dir), and whether lm-eval and datasets stay silent (--quiet)."""

    tasks: tuple[str, ...]
    include: str | None = None
    batch_size: int = 8
    data_dir: str | None = None
    quiet: bool = False


def evaluate(model: nn.Module, tokenizer, device: str, run: TaskRun) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task results for `model` (which must sit on `device` whole), JSON-safe: a metric that
    lm-eval could not compute (its stderr on one sample, say) becomes None rather than NaN."""
    tasks, include, batch_size, data_dir, quiet = list(run.tasks), run.include, run.batch_size, run.data_dir, run.quiet
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = [BUNDLED[t](data_dir) if t in BUNDLED else t for t in tasks]
    use_cache = model.config.use_cache
    model.config.use_cache = False  # lm-eval's scoring forwards would each build a KV cache (generation asks for one)
    try:
        with silenced(quiet):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
            out = simple_evaluate(model=lm, tasks=specs, task_manager=task_manager(include, tuple(tasks)),
                                  log_samples=False)
    finally:
        model.config.use_cache = use_cache  # as the source had it, for --save and --export
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    return {task: {k: clean(v) for k, v in metrics.items()} for task, metrics in out["results"].items()}


@contextmanager
def silenced(quiet: bool) -> Iterator[None]:
    """While the block runs with `quiet`: lm-eval's, datasets' and transformers' loggers below ERROR say nothing, and
    every tqdm bar is off (lm-eval draws some with no way to turn them off: building contexts, checking a cache).
    The loggers' levels and tqdm come back afterwards."""
    if not quiet:
        yield
        return
    import logging

    from tqdm import tqdm

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "transformers", "accelerate")]
    levels = [logger.level for logger in loggers]
    init = tqdm.__init__

    def no_bar(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    for logger in loggers:
        logger.setLevel(logging.ERROR)
    tqdm.__init__ = no_bar
    try:
        yield
    finally:
        tqdm.__init__ = init
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
