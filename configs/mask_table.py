"""The tables of configs/mask_probe.py's JSON: per configuration the test and validation perplexities (mean over
the seeds) and seed 0's test perplexities; then, per solver variant and width, at how many seeds mixed precision
(budget) beats uniform on each test set.

    python3 configs/mask_table.py OUT.json
"""
import json
import sys
from collections import defaultdict

TEST, VALID = ("wikitext2", "ptb", "c4"), ("wt2-valid", "ptb-valid", "c4-heldout")
rows = json.load(open(sys.argv[1]))
by_tag = defaultdict(dict)
for r in rows:
    by_tag[r["tag"]][r["seed"]] = r


def mean(runs: dict, keys: tuple) -> str:
    return " / ".join(f"{sum(r[k] for r in runs.values()) / len(runs):.2f}" for k in keys)


print(f"| configuration | test, mean of {len(next(iter(by_tag.values())))} seeds | validation, mean | test, seed 0 |")
print("| --- | --- | --- | --- |")
for tag, runs in by_tag.items():
    print(f"| {tag} | {mean(runs, TEST)} | {mean(runs, VALID)} | {' / '.join(f'{runs[0][k]:.2f}' for k in TEST)} |")
print("\nseeds at which budget beats uniform, WikiText-2 / PTB / C4:")
for tag, uniform in by_tag.items():
    if tag.startswith("uniform"):
        mixed = by_tag["budget" + tag[len("uniform"):]]
        wins = [sum(mixed[s][k] < u[k] for s, u in uniform.items()) for k in TEST]
        print(f"{tag[len('uniform'):]}: {'/'.join(map(str, wins))} of {len(uniform)}")
