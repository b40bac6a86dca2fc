import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
import sys, torch, time
sys.path.insert(0, str(ROOT))
import torch.nn.functional as F
from transformers import DynamicCache
from kvhub import load_model
from kvhub.text import read_texts, token_windows
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
for p in model.parameters(): p.requires_grad_(False)
L, H, d = 30, 3, 64
gK2 = []; gV2 = []
t = time.time()
for name, text in read_texts([str(ROOT / "corpora/calibration")]):
    for ids in token_windows(tok, text, 1280, int(__import__('os').environ.get('GRAD_WINDOWS', 4)), where="spread"):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :1024], cache=cache, use_cache=True)
        Ks = [la.keys.detach().clone().requires_grad_(True) for la in cache.layers]
        Vs = [la.values.detach().clone().requires_grad_(True) for la in cache.layers]
        c2 = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(zip(Ks, Vs)):
            c2.update(k, v, i)
        logits = model(input_ids=ids[:, 1024:], cache=c2, use_cache=True).logits[0, :-1]
        loss = F.cross_entropy(logits, ids[0, 1025:], reduction="sum")
        gk = torch.autograd.grad(loss, Ks + Vs)
        G = torch.stack([g[0] for g in gk])  # 2L,H,T,d
        G = G[:, :, 4:].permute(2, 0, 1, 3).reshape(1020, 2, L * H * d)
        gK2.append(G[:, 0]); gV2.append(G[:, 1])
    print(name, time.time() - t, flush=True)
torch.save({"K": torch.cat(gK2), "V": torch.cat(gV2)}, str(WORK / f"grads{__import__('os').environ.get('GRAD_WINDOWS', 4)}.pt"))
