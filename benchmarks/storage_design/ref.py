import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
from run import *
from kvhub import KVPreset
from kvhub.integrations.chunks import ChunkCodec, HeadSlice, to_chunks, from_chunks
preset = KVPreset.from_pretrained(str(ROOT / "presets/HuggingFaceTB--SmolLM2-135M-Instruct"))
cc = ChunkCodec(preset, exact=1)
res = {}
for w in ev:
    chunks = to_chunks(list(w["K"].unsqueeze(1)), list(w["V"].unsqueeze(1)), 256)
    outs = []
    for c in chunks:
        buf = torch.zeros(cc.nbytes(c.shape, c.dtype, HeadSlice(0, 3)), dtype=torch.uint8)
        n = cc.encode(c, buf, HeadSlice(0, 3)); o = torch.empty_like(c); cc.decode(buf, o, HeadSlice(0, 3)); outs.append(o)
    k, v = from_chunks(outs, 64)
    r = continuation_nll(model, w["ids"][:, 1024:], k, v)
    res.setdefault(w["corpus"], []).append((r.nll_sum - w["base"]) / w["n"])
deltas = {c: 100 * (math.exp(sum(v) / len(v)) - 1) for c, v in res.items()}
print(f"attention format: {256*2*L*D*2/n:.2f}x mean {sum(deltas.values())/len(deltas):+.2f}% worst {max(deltas.values()):+.2f}% ", " ".join(f"{c[:10]} {v:+.2f}" for c, v in sorted(deltas.items())))
