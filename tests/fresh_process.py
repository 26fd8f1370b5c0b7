"""The child process of test_cli.py::test_the_command_in_a_fresh_process_without_root_powers: the checks that need
a Python process of their own, in one, since each such process imports torch and transformers (seconds). In order:

1. which transformers modules importing the CLI imported (none should be);
2. run() called alone, as bench.py calls it: whether transformers' auto classes were imported before its loading
   thread started, and whether scikit-learn was imported then / can be found;
3. main() on each argv of CASES: (exit code, stderr);
4. the command itself, as `python opt_enhanced.py COMMAND...` runs it, which ends the process.

Each of 1-3 is one line on stderr: "fresh_process NAME JSON".
Usage: python tests/fresh_process.py CASES_JSON RUN_ARGV_JSON COMMAND...
"""
import contextlib
import importlib.util
import io
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def report(name: str, value: object) -> None:
    print("fresh_process", name, json.dumps(value), file=sys.stderr, flush=True)


import opt_enhanced  # noqa: E402
import pipeline.run  # noqa: E402
from systems import interrupts  # noqa: E402

report("imported_by_the_cli", sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))


class Spy(interrupts.Background):
    def __init__(self, fn):
        auto = all(m in sys.modules for m in ("transformers.models.auto.configuration_auto",
                                              "transformers.models.auto.modeling_auto",
                                              "transformers.models.auto.tokenization_auto"))
        report("before_the_loading_thread", {"auto_classes": auto, "sklearn_imported": "sklearn" in sys.modules,
                                             "sklearn_found": importlib.util.find_spec("sklearn.metrics") is not None})
        pipeline.run.Background = interrupts.Background  # once
        super().__init__(fn)


cases, run_argv, command = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
pipeline.run.Background = Spy
pipeline.run.run(opt_enhanced.parse_args(run_argv))
got = []
for argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        got.append([opt_enhanced.main(argv), err.getvalue()])
report("cases", got)
sys.argv = ["opt_enhanced.py", *command]
runpy.run_path(os.path.join(ROOT, "opt_enhanced.py"), run_name="__main__")
