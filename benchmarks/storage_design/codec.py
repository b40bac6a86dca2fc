import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
import sys, math, heapq, time, torch
sys.path.insert(0, str(ROOT))
from kvhub.quantizers.lloyd_max import gaussian_levels
from kvhub.quantizers.uniform import GAUSSIAN_STEP
GAUSSIAN_STEP.update({1: 1.596, 3: 0.586})
torch.set_grad_enabled(False)
L, H, d = 30, 3, 64
D = H * d
STEP = {5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
def table(b):
    if b <= 4:
        lv, th = gaussian_levels(b)
    else:
        n = 2**b; lv = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * STEP[b]; th = (lv[1:] + lv[:-1]) / 2
    return lv.float(), th.float()
TABLES = {b: table(b) for b in range(1, 9)}
# normalized distortion of a unit Gaussian at b bits
def gauss_mse(b, n=200000):
    z = torch.randn(n, generator=torch.Generator().manual_seed(0))
    lv, th = TABLES[b]
    return ((lv[torch.bucketize(z, th)] - z) ** 2).mean().item()
DIST = [1.0] + [gauss_mse(b) for b in range(1, 9)]

class Group:
    def __init__(self, X):  # X [N, F] float
        X = X.double()
        self.mean = X.mean(0)
        C = (X - self.mean).T @ (X - self.mean) / X.shape[0]
        ev, U = torch.linalg.eigh(C)
        self.var = ev.flip(0).clamp_min(1e-12).float(); self.U = U.flip(1).float(); self.mean = self.mean.float()
        self.bits = torch.zeros(len(self.var), dtype=torch.long)
    def roundtrip(self, x):  # x [T, F]
        c = (x - self.mean) @ self.U
        out = torch.zeros_like(c)
        sd = self.var.sqrt().expand(c.shape[0], -1)
        if getattr(self, "scale", None) == "rms":
            on = self.bits > 0
            r = ((c[:, on] / sd[:, on]) ** 2).mean(1, keepdim=True).sqrt().clamp_min(1e-6).half().float() if on.any() else torch.ones(c.shape[0], 1)
            sd = sd * r
        for b in range(1, 9):
            cols = (self.bits == b).nonzero().flatten()
            if cols.numel() == 0: continue
            lv, th = TABLES[b]
            z = c[:, cols] / sd[:, cols]
            out[:, cols] = lv[torch.bucketize(z, th)] * sd[:, cols]
        return out @ self.U.T + self.mean

def allocate(groups, weights, budget_bits):
    """greedy: budget in bits per token summed over all groups"""
    for g in groups: g.bits.zero_()
    heap = []
    for gi, (g, w) in enumerate(zip(groups, weights)):
        wv = g.var * w if torch.is_tensor(w) and w.dim() else g.var * float(w)
        g.wv = wv
        for i in range(len(g.var)):
            heapq.heappush(heap, (-(wv[i].item() * (DIST[0] - DIST[1])), gi, i))
    used = 0
    while used < budget_bits and heap:
        negg, gi, i = heapq.heappop(heap)
        g = groups[gi]; b = g.bits[i].item()
        g.bits[i] = b + 1; used += 1
        if b + 1 < 8:
            heapq.heappush(heap, (-(g.wv[i].item() * (DIST[b + 1] - DIST[b + 2])), gi, i))
    return used
