"""Tiny random-weight models of each supported architecture. They prove mechanics (shapes, masks, beams, padding,
sliding windows), never quality: random attention is near uniform."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvhub.calibration import calibrate

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(num_hidden_layers=2, **_COMMON)),
    # Qwen2 mixing full and sliding layers; a small window so decoding really slides.
    "qwen2-mixed": (Qwen2ForCausalLM, lambda: Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2,
                                                           sliding_window=24, **_COMMON)),
    # Mistral's config makes every layer sliding.
    "mistral": (MistralForCausalLM, lambda: MistralConfig(num_hidden_layers=2, sliding_window=24, **_COMMON)),
    # Gemma-2 alternates sliding and full layers.
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(num_hidden_layers=4, sliding_window=24, **_COMMON)),
}


def tiny_model(arch: str = "llama", seed: int = 0):
    cls, make_config = ARCHS[arch]
    torch.manual_seed(seed)
    config = make_config()
    config._attn_implementation = "eager"
    return cls(config).eval()


def tiny_bases(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    windows = [torch.randint(3, VOCAB, (1, 64), generator=gen) for _ in range(4)]
    return calibrate(model, windows, sink=2, progress=False)[0]
