"""Tiny random-weight models of each supported architecture. They prove mechanics (shapes, masks, beams, padding,
sliding windows), never quality: random attention is near uniform."""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvhub.bases import StreamBasis
from kvhub.calibration import calibrate
from kvhub.codec import Segment, StreamCodec
from kvhub.integrations.chunks import to_chunks
from kvhub.stream import CompressedStream

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


def random_basis(heads: int, dim: int, gen: torch.Generator) -> StreamBasis:
    """A full-rank random orthonormal basis per head with a random mean, its components' variances decreasing from
    ~3 to ~0.03 as calibrated ones do: codecs that spend bits by variance meet the data they are made for."""
    variance = torch.logspace(0.5, -1.5, dim).expand(heads, dim).contiguous()
    u, _ = torch.linalg.qr(torch.randn(heads, dim, dim, generator=gen, dtype=torch.float64))
    mean = torch.randn(heads, dim, generator=gen)
    return StreamBasis(mean, u.float(), variance)


def basis_samples(basis: StreamBasis, bsz: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """``[bsz, heads, tokens, dim]`` Gaussian vectors with the mean, directions and variances of a full-rank
    ``basis``."""
    z = torch.randn(bsz, basis.mean.shape[0], tokens, basis.basis.shape[-1], generator=gen) * basis.variance.sqrt()[:, None]
    return torch.einsum("bhtr,hdr->bhtd", z, basis.basis) + basis.mean[:, None]


def random_stream(segments, projection, scale, heads, dim, bsz, tokens, passthrough, seed, device="cpu",
                  quantizer="uniform", scale_format="fp16"):
    """A stream with a random orthonormal basis whose components have decreasing variance (as calibrated ones do),
    filled in two appends so the stored views are narrower than their allocation."""
    codec = StreamCodec(tuple(Segment(*s) for s in segments), projection, scale, quantizer, scale_format)
    gen = torch.Generator().manual_seed(seed)
    basis = None
    if projection == "pca":
        full = random_basis(heads, dim, gen)
        basis = full.truncated(codec.rank)
        x = basis_samples(full, bsz, tokens, gen)
    else:
        x = torch.randn(bsz, heads, tokens, dim, generator=gen)
    s = CompressedStream(codec, basis, torch.device(device), passthrough)
    cut = tokens // 3
    s.append(x[:, :, :cut].to(device))
    s.append(x[:, :, cut:].to(device))
    return s


def tiny_chunks(model, tokens: int, chunk: int, seed: int) -> list[torch.Tensor]:
    """fp16 LMCache chunks [2, L, chunk, H*d] of ``model``'s real K/V over ``tokens`` random token ids."""
    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return [c.half() for c in to_chunks([la.keys for la in cache.layers], [la.values for la in cache.layers], chunk)]
