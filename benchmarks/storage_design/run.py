import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
import sys, math, time, torch
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(ROOT))
from codec import *
from kvhub import load_model
from kvhub.eval.ppl import continuation_nll
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
cal = torch.load(str(WORK / f"calib{__import__('os').environ.get('CAL_WINDOWS', 6)}.pt"), weights_only=True); ev = torch.load(str(WORK / "eval.pt"), weights_only=True)
def build(layer_groups):
    gs = {}
    for s in ("K", "V"):
        X = cal[s].float()
        for lg in layer_groups:
            cols = torch.cat([torch.arange(l * D, (l + 1) * D) for l in lg])
            gs[(s, tuple(lg))] = (Group(X[:, cols]), cols)
    return gs
def evaluate(gs, tag, exact=4, chunk=256, bits_per_tok=None):
    res = {}
    for w in ev:
        out = {}
        for s in ("K", "V"):
            X = w[s].permute(2, 0, 1, 3).reshape(1024, L * D).float()
            Y = X.clone()
            for (ss, lg), (g, cols) in gs.items():
                if ss != s: continue
                for c0 in range(0, 1024, chunk):
                    Y[c0 + exact:c0 + chunk, cols] = g.roundtrip(X[c0 + exact:c0 + chunk, cols])
            out[s] = Y.reshape(1024, L, H, d).permute(1, 2, 0, 3).half().float()
        r = continuation_nll(model, w["ids"][:, 1024:], list(out["K"].unsqueeze(1)), list(out["V"].unsqueeze(1)))
        res.setdefault(w["corpus"], []).append((r.nll_sum - w["base"]) / w["n"])
    deltas = {c: 100 * (math.exp(sum(v) / len(v)) - 1) for c, v in res.items()}
    bits = sum(int(g.bits.sum()) for g, _ in gs.values())
    per_chunk = (chunk - exact) * bits / 8 + exact * 2 * L * D * 2 + 64
    ratio = chunk * 2 * L * D * 2 / per_chunk
    print(f"{tag}: {ratio:.2f}x  mean {sum(deltas.values())/len(deltas):+.2f}%  worst {max(deltas.values()):+.2f}%  " +
          " ".join(f"{c[:10]} {v:+.2f}" for c, v in sorted(deltas.items())), flush=True)
    return ratio, deltas

def load_grads():
    return torch.load(str(WORK / f"grads{__import__('os').environ.get('GRAD_WINDOWS', 4)}.pt"), weights_only=True)
def budget(R, e=1): return int((256*2*L*D*2/R - 64 - e*2*L*D*2) * 8 / (256 - e))
class TransformGroup(Group):
    """A group with a non-orthogonal transform: T encodes, Ti decodes (set by the subclass)."""
    def roundtrip(self, x):
        c = (x - self.mean) @ self.T
        out = torch.zeros_like(c); sd = self.var.sqrt().expand(c.shape[0], -1)
        for b in range(1, 9):
            cols = (self.bits == b).nonzero().flatten()
            if cols.numel() == 0: continue
            lv, th = TABLES[b]
            out[:, cols] = lv[torch.bucketize(c[:, cols] / sd[:, cols], th)] * sd[:, cols]
        return out @ self.Ti + self.mean
