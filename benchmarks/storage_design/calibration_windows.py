"""Does German (every form's worst corpus) lose for want of calibration tokens? With 4 windows per calibration file
the storage fit saw ~4k German tokens for a transform over 5760 numbers per token. This collects the fit's moments
(kvhub.storage_fit.collect_moments) with W windows per file (default 16), kept per calibration domain in
STORAGE_DESIGN_WORK/dm_w{W}.pt (attention_bases.py reads them too), combines them with every domain weighing the same
(as kvhub.storage_fit.domain_weights does, German times GW), builds the codec and measures the reuse case with the
chunk codec alone on CORPORA (corpus=windows, default German on all 74 windows its text holds).
Writes res_w{W}_gw{GW}.json to STORAGE_DESIGN_WORK; the rows are in ../results/storage_design.json."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ROOT, WORK  # noqa: E402
import copy, json, os, time  # noqa: E401,E402

import torch  # noqa: E402

from kvhub import KVPreset, load_model  # noqa: E402
from kvhub.eval.reuse import codec_round_trip, reuse_delta, reuse_windows  # noqa: E402
from kvhub.integrations.storage_chunks import StorageChunkCodec  # noqa: E402
from kvhub.protocol import calibration_domain  # noqa: E402
from kvhub.storage_fit import StorageFitConfig, _GroupMoments, build_codec, collect_moments, storage_section  # noqa: E402
from kvhub.text import read_texts, token_windows  # noqa: E402

W = int(os.environ.get("W", 16)); GW = float(os.environ.get("GW", 1))
CORP = os.environ.get("CORPORA", "debian_reference_de_b=74").split(",")
FIELDS = ("count", "sum", "outer", "grad_sum", "fisher")
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
preset = KVPreset.from_pretrained(ROOT / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct")
cfg = StorageFitConfig(windows_per_file=W)
tag = f"w{W}_gw{GW:g}"
mpath = WORK / f"dm_w{W}.pt"
if mpath.exists():
    with torch.serialization.safe_globals([_GroupMoments]):  # the one class this script saved
        per = torch.load(mpath, weights_only=True)
else:
    per = {}  # domain -> [moments summed over its files' windows, window count]
    for name, text in read_texts([ROOT / "corpora" / "calibration"]):
        picked = token_windows(tok, text, cfg.prefix + cfg.continuation, W, where="spread")
        t = time.time()
        m = collect_moments(model, picked, preset.shape, cfg, False)
        d = calibration_domain(name)
        if d in per:
            for k in m:
                for f in FIELDS:
                    setattr(per[d][0][k], f, getattr(per[d][0][k], f) + getattr(m[k], f))
            per[d][1] += len(picked)
        else:
            per[d] = [m, len(picked)]
        print(name, len(picked), round(time.time() - t), flush=True)
    torch.save(per, mpath)
moments = None  # every domain alike (each window 1 / its domain's window count), German times GW
for d, (m, n) in per.items():
    w = (GW if d == "debian_reference_de_a" else 1.0) / n
    if moments is None:
        moments = copy.deepcopy(m)
        for k in moments:
            for f in FIELDS:
                setattr(moments[k], f, getattr(m[k], f) * w)
    else:
        for k in moments:
            for f in FIELDS:
                setattr(moments[k], f, getattr(moments[k], f) + getattr(m[k], f) * w)
t = time.time()
codec = build_codec(moments, preset.shape, cfg)
print("build", round(time.time() - t), "ranks", [g.basis.shape[0] for g in codec.groups], flush=True)
p2 = preset.with_storage(codec, storage_section(codec, cfg, "x", 0, 0, []))
texts = dict(read_texts([ROOT / "corpora" / "evaluation"]))
out = {}
for spec in CORP:
    name, n = spec.split("=")
    t = time.time()
    wins = reuse_windows(model, tok, texts[name], int(n), 1024, 256, 256)
    for budget in ("10x", "16x"):
        rt = codec_round_trip(StorageChunkCodec(p2, budget))
        d = reuse_delta(model, wins, [[rt(c).float() for c in w.chunks] for w in wins], 1024, 64)
        out[f"{name} {budget}"] = (round(d.delta_pct, 3), round(d.se, 3))
        print(tag, name, budget, out[f"{name} {budget}"], round(time.time() - t), flush=True)
(WORK / f"res_{tag}.json").write_text(json.dumps(out, indent=1))
