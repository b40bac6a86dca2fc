"""The model card (README.md) of a preset, generated from its config so it can never disagree with it."""

from __future__ import annotations

from typing import Any

from .codec import CacheCodec


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(round(v, 4)) if isinstance(v, float) else str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _front_matter(config: dict[str, Any]) -> str:
    base = config["base_model"]
    lines = [
        "---",
        "library_name: kvhub",
        f"base_model: {_yaml_scalar(base['id'])}",
        f"license: {_yaml_scalar(config.get('license', 'other'))}",
        "tags:",
        "- kvhub",
        "- kv-cache",
        "- kv-cache-compression",
        "- pca",
        "- quantization",
    ]
    m = config.get("metrics")
    if m:
        ppl = m["perplexity"]
        lines += [
            "model-index:",
            f"- name: {_yaml_scalar(base['id'] + ' kvhub preset')}",
            "  results:",
            "  - task:",
            "      type: text-generation",
            "    dataset:",
            f"      name: {_yaml_scalar(m['eval_corpus'])}",
            "      type: text",
            "    metrics:",
            "    - type: kv_compression_ratio",
            f"      value: {_yaml_scalar(m['compression']['total'])}",
            "    - type: perplexity_delta_pct",
            f"      value: {_yaml_scalar(ppl['mean_delta_pct'])}",
        ]
        if "needle" in m:
            lines += ["    - type: needle_accuracy", f"      value: {_yaml_scalar(m['needle']['accuracy'])}"]
    lines.append("---")
    return "\n".join(lines)


def model_card(config: dict[str, Any]) -> str:
    base = config["base_model"]
    codec = CacheCodec.from_dict(config["codec"])
    cal = config["calibration"]
    out = [
        _front_matter(config),
        "",
        f"# kvhub preset for {base['id']}",
        "",
        "A calibrated KV-cache compression preset for [kvhub](https://github.com/kvhub/kvhub): per layer and KV head, "
        "keys and values are rotated onto a PCA basis fitted on calibration text and stored as packed low-bit codes, "
        "with the first tokens and a recent window kept exact.",
        "",
        "```python",
        "from kvhub import KVPreset, load_model",
        f'model, tok = load_model("{base["id"]}")',
        'preset = KVPreset.from_pretrained("<this repo>")',
        "out = model.generate(**tok(\"Hello\", return_tensors=\"pt\"), cache=preset.build_cache(model), max_new_tokens=32)",
        "```",
        "",
        "## Base model",
        f"- id: `{base['id']}`" + (f" at `{base['revision']}`" if base.get("revision") else ""),
        f"- architecture: {base['architecture']}, {base['num_hidden_layers']} layers, "
        f"{base['num_key_value_heads']} KV heads, head_dim {base['head_dim']}",
    ]
    if base.get("provenance"):
        out.append(f"- weights: {base['provenance']}")
    m = config.get("metrics")
    out += ["", "## Measured"]
    if m:
        c, ppl = m["compression"], m["perplexity"]
        out += [
            f"At {m['context_length']} tokens, on {m['hardware']}, {m['date']}, kvhub {m['kvhub_version']}:",
            "",
            "| metric | value |",
            "|---|---|",
            f"| KV compression vs fp16 (total / keys / values) | {c['total']:.2f}x / {c['keys']:.2f}x / {c['values']:.2f}x |",
            f"| perplexity delta, mean over corpora | {ppl['mean_delta_pct']:+.2f}% |",
        ]
        for name, row in ppl["corpora"].items():
            out.append(f"| perplexity {name} (base -> compressed) | {row['base']:.2f} -> {row['compressed']:.2f} ({row['delta_pct']:+.2f}%) |")
        if "needle" in m:
            n = m["needle"]
            out.append(f"| needle accuracy (compressed / baseline) | {n['accuracy']:.2f} / {n['baseline_accuracy']:.2f} |")
        if m.get("command"):
            out += ["", f"Reproduce: `{m['command']}`"]
    else:
        out.append("Not measured yet.")
    out += [
        "",
        "## Codec",
        f"Calibrated on {cal['tokens']} tokens of `{cal['corpus']}` (windows of {cal['seq_len']}, "
        f"first {cal['sink']} positions excluded).",
        "",
        "| layer | keys | values | sink | window |",
        "|---|---|---|---|---|",
    ]
    for row in codec.describe():
        k, v = row["keys"], row["values"]
        out.append(f"| {row['layer']} | {k['layout']} ({k['scale']}) | {v['layout']} ({v['scale']}) | {row['sink']} | {row['window']} |")
    return "\n".join(out) + "\n"
