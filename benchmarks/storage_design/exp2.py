import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
from run import *
grads = load_grads()
def fisher_w(gs):
    out = []
    for (s, lg), (g, cols) in gs.items():
        gc = grads[s][:, cols].float() @ g.U
        out.append((gc ** 2).mean(0))
    return out
groups = [[l] for l in range(L)] if sys.argv[1] == "layer" else [list(range(L))] if sys.argv[1] == "all" else [list(range(i, i+int(sys.argv[1]))) for i in range(0, L, int(sys.argv[1]))]
gs = build(groups)
gl = [g for g, _ in gs.values()]
w = fisher_w(gs)
import os
for g in gl: g.scale = os.environ.get('SCALE')
extra = 16*len(gl) if os.environ.get('SCALE') else 0
for R in [int(r) for r in os.environ.get('RS','8 10 16').split()]:
    allocate(gl, w, budget(R) - extra)
    evaluate(gs, f"{sys.argv[1]} fisher scale={os.environ.get('SCALE')} R{R}", exact=1)
