"""Mean perplexities of a sweep's JSON (importance_sweep.py, shrinkage_sweep.py, fisher_probe.py) per width and variant.

    python3 configs/sweep_table.py OUT.json [OUT2.json ...]

"valid %" / "test %": change against uniform at the same width and seed, averaged over the three texts and the seeds."""
import json
import sys
from collections import defaultdict

VALID, TEST = ("wt2-valid", "ptb-valid", "c4-heldout"), ("wikitext2", "ptb", "c4")
rows = [r for path in sys.argv[1:] for r in json.load(open(path))]
uniform = {(r["seed"], r["tag"][-1]): r for r in rows if r["tag"].startswith("uniform")}
groups = defaultdict(list)
for r in rows:
    key = "uniform" if r["tag"].startswith("uniform") else str(r.get("variant", r.get("lam")))
    groups[(r["tag"][-1], key)].append(r)


def mean(rs, keys):
    return " / ".join(f"{sum(r[k] for r in rs) / len(rs):.2f}" for k in keys)


def change(rs, keys):
    return sum(r[k] / uniform[(r["seed"], w)][k] - 1 for r in rs for k in keys) / len(rs) / len(keys) * 100


print("| bits | variant | seeds | valid: WT2 / PTB / C4 | valid % | test: WT2 / PTB / C4 | test % |")
print("| --- | --- | ---: | --- | ---: | --- | ---: |")
for (w, key), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "uniform", kv[0][1])):
    print(f"| {w}.0 | {key} | {len(rs)} | {mean(rs, VALID)} | {change(rs, VALID):+.2f} | {mean(rs, TEST)} | {change(rs, TEST):+.2f} |")
