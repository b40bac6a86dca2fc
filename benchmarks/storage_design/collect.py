"""Collect calibration KV (fp16-rounded, post-RoPE) and eval windows' prefix KV for the storage-codec prototype."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
import sys, time, torch
sys.path.insert(0, str(ROOT))
from transformers import DynamicCache
from kvhub import load_model
from kvhub.text import read_texts, token_windows
from kvhub.eval.ppl import continuation_nll
torch.manual_seed(0)
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
def kv(ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    K = torch.stack([la.keys[0] for la in cache.layers])  # L,H,T,d
    V = torch.stack([la.values[0] for la in cache.layers])
    return K, V
t=time.time()
calK, calV = [], []
for name, text in read_texts([str(ROOT / "corpora/calibration")]):
    for ids in token_windows(tok, text, 1024, int(__import__("os").environ.get("CAL_WINDOWS", 6)), where="spread"):
        K, V = kv(ids)
        L,H,T,d = K.shape
        calK.append(K[:, :, 4:].permute(2,0,1,3).reshape(T-4, L*H*d).half())
        calV.append(V[:, :, 4:].permute(2,0,1,3).reshape(T-4, L*H*d).half())
torch.save({"K": torch.cat(calK), "V": torch.cat(calV)}, str(WORK / f"calib{__import__('os').environ.get('CAL_WINDOWS', 6)}.pt"))
print("calib", time.time()-t, torch.cat(calK).shape, flush=True)
if (WORK / "eval.pt").exists():
    sys.exit(0)  # the evaluation windows are the same for every calibration size
ev = []
for name, text in read_texts([str(ROOT / "corpora/evaluation")]):
    for ids in token_windows(tok, text, 1280, int(sys.argv[1]) if len(sys.argv)>1 else 3):
        K, V = kv(ids[:, :1024])
        base = continuation_nll(model, ids[:, 1024:], list(K.unsqueeze(1)), list(V.unsqueeze(1)))
        ev.append(dict(corpus=name, ids=ids, K=K.half(), V=V.half(), base=base.nll_sum, n=base.tokens))
torch.save(ev, str(WORK / "eval.pt"))
print("eval", time.time()-t, len(ev))
