"""Issue 23's question for the attention form: does the bundled preset lose on code and German because its bases were
fitted on the books alone (40,960 tokens)? Refits its per-layer, per-head PCA bases from calibration_windows.py's
moments (STORAGE_DESIGN_WORK/dm_w{W}.pt: 16 windows of every calibration file, the prefix K/V as stored, every domain
weighing the same, ~147k tokens), keeps its codec, and runs `kvhub eval`'s protocol (7 corpora x 3 windows x 2048
tokens). MODE=pca: components by variance; MODE=fisher: by variance times the continuation loss's Fisher information
along them (which components the values' 4-bit half gets). Writes bases_{MODE}_*.json to STORAGE_DESIGN_WORK; the
rows are in ../results/attention_bases.json."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ROOT, WORK  # noqa: E402
import json, os, time  # noqa: E401,E402
import torch  # noqa: E402
from kvhub import KVPreset, load_model  # noqa: E402
from kvhub.bases import Bases, StreamBasis, variance_floor  # noqa: E402
from kvhub.cache import CompressedCache  # noqa: E402
from kvhub.eval import EvalConfig, evaluate  # noqa: E402
from kvhub.storage_fit import _GroupMoments  # noqa: E402
MODE = os.environ.get("MODE", "pca"); CODEC = os.environ.get("CODEC", str(ROOT / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct"))
W = int(os.environ.get("W", 16))
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
preset = KVPreset.from_pretrained(CODEC)
shape = preset.shape
L, H, d = shape.num_layers, shape.num_kv_heads, shape.head_dim
with torch.serialization.safe_globals([_GroupMoments]):  # the one class calibration_windows.py saved
    per = torch.load(WORK / f"dm_w{W}.pt", weights_only=True)
tot = {}
for dom, (m, n) in per.items():
    for (stream, layers), g in m.items():
        acc = tot.setdefault(stream, {f: 0 for f in ("count", "sum", "outer", "grad_sum", "fisher")})
        for f in acc:
            acc[f] = acc[f] + getattr(g, f) / n
bases = Bases()
for stream, a in tot.items():
    mean = a["sum"] / a["count"]
    gmean = a["grad_sum"] / a["count"]
    for l in range(L):
        means, vecs, vars_ = [], [], []
        for h in range(H):
            i = slice(l * H * d + h * d, l * H * d + (h + 1) * d)
            c = a["outer"][i, i] / a["count"] - torch.outer(mean[i], mean[i])
            ev, u = torch.linalg.eigh(c)
            ev, u = ev.flip(0).clamp_min(0), u.flip(1)
            ev = torch.maximum(ev, variance_floor(ev))
            if MODE == "fisher":
                j = slice(h * d, (h + 1) * d)
                g = a["fisher"][l, j, j] / a["count"] - torch.outer(gmean[l, j], gmean[l, j])
                imp = ev * torch.einsum("dr,de,er->r", u, g, u)
                order = imp.argsort(descending=True)
                ev, u = ev[order], u[:, order]
            idx = u.abs().argmax(0)
            s = torch.sign(u[idx, torch.arange(d)])
            u = u * torch.where(s == 0, 1.0, s)
            means.append(mean[i].float()); vecs.append(u.float()); vars_.append(ev.float())
        bases[(l, stream)] = StreamBasis(torch.stack(means), torch.stack(vecs), torch.stack(vars_))
codec = preset.codec
make = lambda: CompressedCache(model.config, codec, bases.rotated_for(codec, shape))
t = time.time()
r = evaluate(model, tok, make, EvalConfig(ppl_files=[str(ROOT / "corpora" / "evaluation")], progress=False))
out = {k: (round(v["delta_pct"], 3), round(v.get("delta_pct_se", 0), 3)) for k, v in r.ppl.items()}
print(MODE, CODEC.split("/")[-1], "compression", {k: round(v, 3) for k, v in r.compression.items()}, "worst", r.worst,
      "mean", round(r.mean_delta_pct, 3), json.dumps(out), round(time.time() - t), flush=True)
json.dump({"mode": MODE, "codec": CODEC, "ppl": out, "compression": r.compression},
          open(WORK / f"bases_{MODE}_{CODEC.split('/')[-1]}.json", "w"), indent=1)
