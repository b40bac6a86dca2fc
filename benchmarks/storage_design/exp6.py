"""exp5's codec (per-layer Fisher blocks, all 30 layers) with the calibration moments weighted per domain.
WEIGHTS: comma list of domain=weight (novels, scripture, docs, code, german, logs; default 1 each); BALANCE=1 divides a
domain's weight among its files (the four novels), BALANCE=0 weighs every file alike (what kvhub shipped first).
Evaluates on the 18 non-German windows of eval.pt and the 12 of eval_de.pt (collect_german.py)."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import WORK  # noqa: E402
import os
from run import *  # noqa: F401,F403  (model, cal, ev, evaluate, budget, TransformGroup, allocate, load_grads)
ev[:] = [w for w in ev if not w["corpus"].startswith("debian_reference")] + torch.load(str(WORK / "eval_de.pt"), weights_only=True)
FILES = ["novels"] * 4 + ["logs", "german", "scripture", "docs", "code"]  # calib6.pt's files, in read_texts order
if not (WORK / "moments.pt").exists():  # per file: K/V mean and second moment, gradient mean and per-layer blocks
    grads = load_grads()
    mom = {}
    for s in ("K", "V"):
        X, G = cal[s], grads[s]
        nx, ng = X.shape[0] // 9, G.shape[0] // 9
        mom[s] = []
        for f in range(9):
            x = X[f * nx:(f + 1) * nx].double(); gb = G[f * ng:(f + 1) * ng].double().reshape(ng, L, D).transpose(0, 1)
            mom[s].append(dict(m=x.mean(0), S=(x.T @ x / nx).float(), gm=gb.mean(1), GS=gb.transpose(1, 2) @ gb / ng))
    torch.save(mom, str(WORK / "moments.pt")); del grads
mom = torch.load(str(WORK / "moments.pt"), weights_only=True)
spec = dict(kv.split("=") for kv in os.environ.get("WEIGHTS", "").split(",") if kv)
balance = os.environ.get("BALANCE", "1") == "1"
fw = torch.tensor([float(spec.get(d, 1.0)) / (FILES.count(d) if balance else 1) for d in FILES], dtype=torch.float64)
fw /= fw.sum()
class WGroup(TransformGroup):
    def __init__(self, per, lam=1e-2):
        m = sum(w * p["m"] for w, p in zip(fw, per))
        C = sum(w * p["S"].double() for w, p in zip(fw, per)) - torch.outer(m, m)
        gm = sum(w * p["gm"] for w, p in zip(fw, per))
        ev_, q = torch.linalg.eigh(sum(w * p["GS"] for w, p in zip(fw, per)) - gm[:, :, None] * gm[:, None, :])
        ev_ = ev_.clamp_min(0); ev_ = ev_ + lam * ev_.mean()
        A = torch.block_diag(*((q * ev_.sqrt()[:, None, :]) @ q.transpose(1, 2)))
        Ai = torch.block_diag(*((q / ev_.sqrt()[:, None, :]) @ q.transpose(1, 2)))
        e2, U = torch.linalg.eigh(A @ C @ A)
        self.var = e2.flip(0).clamp_min(1e-12).float(); U = U.flip(1)
        self.T = (A @ U).float(); self.Ti = (U.T @ Ai).float(); self.mean = m.float()
        self.bits = torch.zeros(len(self.var), dtype=torch.long)
gs = {(s, tuple(range(L))): (WGroup(mom[s]), torch.arange(L * D)) for s in ("K", "V")}
gl = [g for g, _ in gs.values()]
for R in [int(r) for r in os.environ.get("RS", "10 16").split()]:
    allocate(gl, [1.0] * len(gl), budget(R))
    evaluate(gs, f"{os.environ.get('WEIGHTS') or ('domains alike' if balance else 'files alike')} R{R}", exact=1)
