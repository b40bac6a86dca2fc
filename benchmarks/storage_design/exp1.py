import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import HERE, ROOT, WORK  # noqa: E402
from run import *
per_layer = build([[l] for l in range(L)])
gl = list(per_layer.values())
for wname, wf in [("raw", lambda g: 1.0), ("reltrace", lambda g: 1.0 / g.var.sum().item())]:
    for R in (8, 10, 16):
        allocate([g for g, _ in gl], [wf(g) for g, _ in gl], budget(R))
        evaluate(per_layer, f"per-layer {wname} R{R}", exact=1)
