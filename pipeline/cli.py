"""The command line's frame around a run: exit codes, one-line errors, and the cleanup of a failed or interrupted
run's outputs. opt_enhanced.py defines the flags and calls `main`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from typing import Callable

import datautils
from modelutils import ModelError, import_transformers
from pipeline.checks import check_model, validate
from pipeline.config import RunConfig, UsageError
from pipeline.placement import device_starting, run_device
from pipeline.run import run
from systems import distributed, streaming
from systems.interrupts import Interrupted, sigterm_interrupts
from systems.progress import current_stage, process_seconds, quiet_libraries, set_stage


def _outputs(cfg: RunConfig | None) -> dict[str, str]:
    if cfg is None:
        return {}
    return {flag: path for flag, path in (("save", cfg.save), ("export", cfg.export),
                                          ("results_json", cfg.results_json), ("plot", cfg.plot)) if path}


def _remove_new_outputs(cfg: RunConfig | None, existed: dict[str, bool]) -> None:
    """After a failed or interrupted run: remove what it wrote under the output paths (validated at the
    start as absent or empty directories, so nothing of the user's goes)."""
    for flag, path in _outputs(cfg).items():
        if flag not in existed:  # never validated: leave it alone
            continue
        if flag in ("save", "export"):
            if os.path.isdir(path) and not existed[flag]:
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isdir(path):  # was an empty directory: empty it again
                for entry in os.listdir(path):
                    full = os.path.join(path, entry)
                    shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
        elif not existed[flag] and os.path.isfile(path):
            os.remove(path)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + (" ..." if len(text) > 500 else "")


def main(argv: list[str], parse_args: Callable[[list[str]], RunConfig], script: str) -> int:
    """The command's life: flags (`parse_args`) -> checks -> run -> outputs, or one error line. Exit codes:
    0 done; 2 a usage error (flags, model, data or output paths: nothing was started); 1 the run failed
    (non-finite numbers, results that cannot be right, unexpected errors); 130/143 interrupted by SIGINT/SIGTERM.
    Every error is one line on stderr; --debug adds the traceback. `script`: the file --gpus relaunches."""
    argv = list(argv)
    debug = "--debug" in argv
    set_stage("checking the flags")
    cfg, existed, started = None, {}, False
    with sigterm_interrupts():
        try:
            cfg = parse_args(argv)
            validate(cfg)
            if cfg.gpus > 1 and distributed.launched_size() == 1:
                set_stage(f"running {cfg.gpus} processes")
                return distributed.launch(cfg.gpus, [os.path.abspath(script), *argv])
            existed = {flag: os.path.exists(path) for flag, path in _outputs(cfg).items()}  # dirs: empty ones
            with device_starting(cfg):  # the GPU starts while transformers is imported: seconds each
                set_stage("importing transformers")
                import_transformers()
            check_model(cfg)
            started = True
            with distributed.session(run_device(cfg)), quiet_libraries(cfg.quiet):
                results = run(cfg, startup=process_seconds())
            error = None
        except (UsageError, datautils.DataError, ModelError, FileNotFoundError) as e:
            error, code, message = e, 2, _one_line(e)
        except distributed.PeerLost as e:
            error, code, message = e, 1, f"lost contact with the other processes while {current_stage()}: {e}"
        except (FloatingPointError, RuntimeError) as e:
            error, code, message = e, 1, _one_line(e)
        except KeyboardInterrupt as e:
            error, code, message = e, 130, f"interrupted (SIGINT) while {current_stage()}; temporary outputs removed"
        except Interrupted as e:
            error, code, message = e, 143, f"terminated (SIGTERM) while {current_stage()}; temporary outputs removed"
        except Exception as e:
            error, code = e, 1
            message = f"unexpected {type(e).__name__} while {current_stage()}: {_one_line(e)} (rerun with --debug " \
                      f"for the traceback)"
        rank, processes = distributed.launched_rank(), distributed.launched_size()
        if error is not None:  # still inside: a second signal during this cleanup is ignored
            if debug:
                traceback.print_exception(error)
            if rank == 0:  # the one writer
                _remove_new_outputs(cfg, existed)
            streaming.remove_scratch()  # each process's --stream files (its finalizers never run: os._exit)
            where = f"rank {rank}: " if processes > 1 and started else ""
            reported = distributed.report(error, code, f"error: {where}{message}")  # under --gpus: the launcher says it
            if (rank == 0 or started) and not reported:  # the checks before the run give every process the same answer
                print(f"error: {where}{message}", file=sys.stderr)
            return code
    if rank != 0:
        return 0
    ppl = results["perplexity"]
    print(json.dumps({"perplexity": {k: round(v, 3) for k, v in ppl.items()}, "timings": results["timings"],
                      "outputs": _outputs(cfg)}))
    return 0
