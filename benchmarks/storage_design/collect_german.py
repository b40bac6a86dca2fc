"""12 more evaluation windows of the German corpus (spread over it), for exp6.py: German is every form's worst
corpus, and 3 windows rank its variants too coarsely."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ROOT, WORK  # noqa: E402
import torch
sys.path.insert(0, str(ROOT))
from transformers import DynamicCache
from kvhub import load_model
from kvhub.text import read_texts, token_windows
from kvhub.eval.ppl import continuation_nll
model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
torch.set_grad_enabled(False)
ev = []
for name, text in read_texts([str(ROOT / "corpora/evaluation/debian_reference_de_b.txt")]):
    for ids in token_windows(tok, text, 1280, 12, where="spread"):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :1024], cache=cache, use_cache=True)
        K, V = torch.stack([la.keys[0] for la in cache.layers]), torch.stack([la.values[0] for la in cache.layers])
        base = continuation_nll(model, ids[:, 1024:], list(K.unsqueeze(1)), list(V.unsqueeze(1)))
        ev.append(dict(corpus=name, ids=ids, K=K.half(), V=V.half(), base=base.nll_sum, n=base.tokens))
torch.save(ev, str(WORK / "eval_de.pt"))
