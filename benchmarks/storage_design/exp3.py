import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
import os
from run import *
grads = load_grads()
G = int(sys.argv[1]); lam = float(sys.argv[2])
groups = [list(range(i, i + G)) for i in range(0, L, G)]
class FGroup(TransformGroup):
    def __init__(self, X, Gr):
        Gr = Gr.double(); F = Gr.T @ Gr / Gr.shape[0]
        ev, Q = torch.linalg.eigh(F); ev = ev.clamp_min(0) + lam * ev.mean()
        A = Q @ torch.diag(ev.sqrt()) @ Q.T; Ai = Q @ torch.diag(1 / ev.sqrt()) @ Q.T
        X = X.double(); mean = X.mean(0); Xc = (X - mean) @ A
        C = Xc.T @ Xc / X.shape[0]
        e2, U = torch.linalg.eigh(C)
        self.var = e2.flip(0).clamp_min(1e-12).float(); U = U.flip(1)
        self.T = (A @ U).float(); self.Ti = (U.T @ Ai).float(); self.mean = mean.float()
        self.bits = torch.zeros(len(self.var), dtype=torch.long)
gs = {}
for s in ("K", "V"):
    X = cal[s].float()
    for lg in groups:
        cols = torch.cat([torch.arange(l * D, (l + 1) * D) for l in lg])
        gs[(s, tuple(lg))] = (FGroup(X[:, cols], grads[s][:, cols]), cols)
gl = [g for g, _ in gs.values()]
for R in [int(r) for r in os.environ.get('RS','10').split()]:
    allocate(gl, [1.0] * len(gl), budget(R))
    evaluate(gs, f"fisher-metric G{G} lam{lam} R{R}", exact=1)
