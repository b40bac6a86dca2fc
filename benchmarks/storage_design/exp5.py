import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
import os
from run import *
grads = load_grads()
mode = sys.argv[1]  # 'block' or 'full'
lam = 1e-2
def moments(X, bs=4096):
    n = X.shape[0]; s = torch.zeros(X.shape[1], dtype=torch.float64); C = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    for i in range(0, n, bs):
        x = X[i:i+bs].double(); s += x.sum(0); C += x.T @ x
    m = s / n; return m, C / n - torch.outer(m, m)
class BGroup(TransformGroup):
    def __init__(self, X, Gr):
        mean, C = moments(X)
        _, Fm = moments(Gr)  # covariance of grads ~ fisher (mean ~ 0)
        F = Fm.shape[0]
        if mode == "block":
            mask = torch.zeros(F, F, dtype=torch.bool)
            for l in range(F // D): mask[l*D:(l+1)*D, l*D:(l+1)*D] = True
            Fm = Fm * mask
        ev, Q = torch.linalg.eigh(Fm); ev = ev.clamp_min(0) + lam * ev.clamp_min(0).mean()
        A = (Q * ev.sqrt()) @ Q.T; Ai = (Q / ev.sqrt()) @ Q.T
        e2, U = torch.linalg.eigh(A @ C @ A)
        self.var = e2.flip(0).clamp_min(1e-12).float(); U = U.flip(1)
        self.T = (A @ U).float(); self.Ti = (U.T @ Ai).float(); self.mean = mean.float()
        self.bits = torch.zeros(len(self.var), dtype=torch.long)
G = int(sys.argv[2])
groups = [list(range(i, i + G)) for i in range(0, L, G)]
gs = {}
for s in ("K", "V"):
    for lg in groups:
        cols = torch.cat([torch.arange(l * D, (l + 1) * D) for l in lg])
        gs[(s, tuple(lg))] = (BGroup(cal[s][:, cols], grads[s][:, cols]), cols)
gl = [g for g, _ in gs.values()]
for R in [int(r) for r in os.environ.get('RS','10 16').split()]:
    allocate(gl, [1.0] * len(gl), budget(R))
    ks = [int((g.bits > 0).sum()) for g in gl]
    print("kept components per group", ks, "bits hist", torch.bincount(torch.cat([g.bits for g in gl]), minlength=9).tolist(), flush=True)
    evaluate(gs, f"{mode}-fisher G{G} R{R}", exact=1)
