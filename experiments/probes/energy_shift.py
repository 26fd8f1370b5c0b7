"""How well the calibration text predicts each input channel's activation energy on other text.

For every distinct Linear input of the dense opt-mini: e_j = mean over tokens of x_j^2 on the 128 C4 calibration
windows (seed 0) and on PTB / WikiText-2 validation. rho_j = e_j(other) / e_j(C4), centred in log per Linear;
printed: its spread sd(log rho), the Spearman correlation of log rho with the channel's C4 energy and with its
window-to-window variability on C4 (coefficient of variation), and the R^2 of a fit of log rho on both. Channels
that are silent on either text (fc2 inputs after the ReLU) are left out. If the C4 statistics predicted which
channels other text excites more, a per-channel correction of the allocator would be possible; if not, only a
uniform hedge (ERROR_SHRINKAGE) is.

    python3 experiments/probes/energy_shift.py [--model .local/opt-mini --data_dir .local/data]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # experiments/

import torch  # noqa: E402
from validation_texts import validation_texts  # noqa: E402

import datautils  # noqa: E402
from modelutils import find_linears, load_model  # noqa: E402
from tokenizer_loading import get_tokenizer  # noqa: E402

SEQLEN = 2048


def windows(ids: torch.Tensor, n: int) -> torch.Tensor:
    k = min(n, ids.numel() // SEQLEN)
    return ids.flatten()[: k * SEQLEN].reshape(k, SEQLEN)


@torch.no_grad()
def energies(model, linears: dict, ids: torch.Tensor, dev: torch.device) -> dict[str, torch.Tensor]:
    """(windows, columns) mean x_j^2 per window, for each Linear input."""
    out = {k: [] for k in linears}
    sink = lambda k, x: out[k].append((x.double() ** 2).reshape(-1, x.shape[-1]).mean(0))
    handles = [m.register_forward_pre_hook(lambda _m, inp, k=k: sink(k, inp[0])) for k, m in linears.items()]
    for w in ids:
        model(w[None].to(dev))
    for h in handles:
        h.remove()
    return {k: torch.stack(v).cpu() for k, v in out.items()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.argsort().argsort().double(), b.argsort().argsort().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def r2(y: torch.Tensor, *xs: torch.Tensor) -> float:
    X = torch.stack([torch.ones_like(y), *xs], 1)
    fit = X @ torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    return 1 - float(((y - fit) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def summary(rows: list) -> str:
    sds = [r[2] for r in rows]
    return f"sd(log rho) {min(sds):.2f}-{max(sds):.2f}" if rows else "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".local/opt-mini")
    p.add_argument("--data_dir", default=".local/data")
    p.add_argument("--cache_dir", default="/tmp/opt-enhanced-cache")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = get_tokenizer(args.model)
    texts = validation_texts(tok, args.data_dir, args.cache_dir, SEQLEN)
    model = load_model(args.model, True).float().to(dev).eval()
    linears = {f"{i}.{n}": m for i, layer in enumerate(model.model.decoder.layers)
               for n, m in find_linears(layer).items() if n not in ("self_attn.k_proj", "self_attn.v_proj")}
    calibration = datautils.get_calibration("c4", tok, 128, 0, SEQLEN, args.data_dir, args.cache_dir)
    calib = energies(model, linears, calibration, dev)
    other = {t: energies(model, linears, windows(texts[t], 128), dev) for t in ("ptb-valid", "wt2-valid")}
    print("Linear input         | " + " | ".join(f"{t}: sd(log rho) corr(energy) corr(cv) R^2" for t in other))
    found = []  # (text, Linear input, sd, corr energy, corr cv, R^2)
    for k, c in calib.items():
        mean, cv = c.mean(0), c.std(0) / c.mean(0)
        for t, e in other.items():
            live = (mean > 0) & (e[k].mean(0) > 0)
            log_rho = (e[k].mean(0)[live] / mean[live]).log()
            log_rho -= log_rho.mean()
            found.append((t, k, float(log_rho.std()), spearman(log_rho, mean[live]), spearman(log_rho, cv[live]),
                          r2(log_rho, mean[live].log(), cv[live].log())))
        print(f"{k:20s} | " + " | ".join(f"{sd:.2f} {ce:+.2f} {cc:+.2f} {fit:.2f}" for _, _, sd, ce, cc, fit in found[-2:]))
    for t in other:
        mine = [r for r in found if r[0] == t]
        deep_fc2 = [r for r in mine if r[1].endswith("fc2") and not r[1].startswith("0.")]
        print(f"{t}: fc2 of layers 1-7 {summary(deep_fc2)}; other inputs {summary([r for r in mine if r not in deep_fc2])}; "
              f"max |Spearman| {max(max(abs(r[3]), abs(r[4])) for r in mine):.2f}; max R^2 {max(r[5] for r in mine):.2f}, "
              f"R^2 <= 0.10 for {sum(r[5] <= 0.10 for r in mine)} of {len(mine)}")


if __name__ == "__main__":
    main()
