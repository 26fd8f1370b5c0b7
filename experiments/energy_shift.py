"""How well the calibration text predicts each input channel's activation energy on other text.

For every distinct Linear input of the dense opt-mini: e_j = mean over tokens of x_j^2 on the 128 C4 calibration
windows (seed 0) and on PTB / WikiText-2 validation. rho_j = e_j(other) / e_j(C4), centred in log per Linear;
printed: its spread sd(log rho), the Spearman correlation of log rho with the channel's C4 energy and with its
window-to-window variability on C4 (coefficient of variation), and the R^2 of a fit of log rho on both. Channels
that are silent on either text (fc2 inputs after the ReLU) are left out. If the C4 statistics predicted which
channels other text excites more, a per-channel correction of the allocator would be possible; if not, only a
uniform hedge (ERROR_SHRINKAGE) is.

    PYTHONPATH=. python3 experiments/energy_shift.py   # repo root, ../shared copies in .local/
"""
import torch

import datautils
from modelutils import find_linears, load_opt
from sweeplib import C, D, M, TEXTS, dev, tok

SEQLEN = 2048


def windows(ids: torch.Tensor, n: int) -> torch.Tensor:
    k = min(n, ids.numel() // SEQLEN)
    return ids.flatten()[: k * SEQLEN].reshape(k, SEQLEN)


@torch.no_grad()
def energies(model, linears: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
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


model = load_opt(M, True).float().to(dev).eval()
linears = {f"{i}.{n}": m for i, layer in enumerate(model.model.decoder.layers)
           for n, m in find_linears(layer).items() if n not in ("self_attn.k_proj", "self_attn.v_proj")}
calib = energies(model, linears, datautils.get_calibration("c4", tok, 128, 0, SEQLEN, D, C))
other = {t: energies(model, linears, windows(TEXTS[t], 128)) for t in ("ptb-valid", "wt2-valid")}
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


def summary(rows: list) -> str:
    sds = [r[2] for r in rows]
    return f"sd(log rho) {min(sds):.2f}-{max(sds):.2f}" if rows else "none"


for t in other:
    mine = [r for r in found if r[0] == t]
    deep_fc2 = [r for r in mine if r[1].endswith("fc2") and not r[1].startswith("0.")]
    print(f"{t}: fc2 of layers 1-7 {summary(deep_fc2)}; other inputs {summary([r for r in mine if r not in deep_fc2])}; "
          f"max |Spearman| {max(max(abs(r[3]), abs(r[4])) for r in mine):.2f}; max R^2 {max(r[5] for r in mine):.2f}, "
          f"R^2 <= 0.10 for {sum(r[5] <= 0.10 for r in mine)} of {len(mine)}")
