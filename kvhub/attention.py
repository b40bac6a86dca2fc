"""Attention computed from the compressed storage, so decoding never rebuilds K or V.

A layer with compressed history hands attention only its exact tokens (sink, recent, new), tagged with the layer;
:func:`attend` builds the mask in storage order and runs the call on a decode backend (:mod:`kvhub.backends`: fused
Triton kernels on CUDA, C kernels on CPU, PyTorch ops for everything else), which reads the history's codes through
the preset's decode plan (:mod:`kvhub.plan`).

The switch is scoped and keeps the user's kernel: ``with compressed_attention(model):`` sets the model's attention
implementation to ``kvhub_<kernel>`` (``kvhub_sdpa``, ``kvhub_eager``, ``kvhub_flash_attention_2``, ...), whose mask is
the user's kernel's mask; a call whose cache layer has compressed history runs here, every other call (a prefill with
nothing stored yet, uncompressed layers, other caches) goes to the user's kernel unchanged. On exit the model gets its
kernel back. The switch is counted per model: blocks in several threads over one model (one generation each) keep it
on until the last one exits.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import backends
from .layer import MASKED

PREFIX = "kvhub_"


def is_compressed_attention(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def _kernel(name: str, module):
    """The user's attention function: a registered one, or the model's own eager attention."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _additive(mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """The kernel's mask as an additive float ``[B|1, 1, M, kv]`` (bool masks: True attends; 2D padding masks are
    widened to the query rows; the causal part of a 2D mask is added by :meth:`CompressedLayer.storage_mask` only
    when the chunk needs one, as flash kernels do themselves)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask.bool()[:, None, None, :].expand(-1, 1, query_length, -1)
        if query_length > 1:
            kv = mask.shape[-1]
            causal = torch.ones(query_length, kv, dtype=torch.bool, device=mask.device).tril_(kv - query_length)
            mask = mask & causal
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, MASKED)
    return mask.float()


def attend(layer, query, key, value, attention_mask, scaling, softcap):
    """Attention of ``query`` [B, Hq, M, d] over ``layer``'s compressed history and the exact tokens ``key``/``value``
    that :meth:`CompressedLayer.update` returned, under the model kernel's ``attention_mask`` (4-D additive or
    boolean, 2-D padding, or None). Returns ``(output [B, M, Hq, d], None)`` as transformers' attention functions
    do."""
    bsz, _, q_len, dim = query.shape
    n_sink, history = key._kvhub_sink, layer.take_history()
    total = key.shape[-2] + history
    mask = layer.storage_mask(_additive(attention_mask, q_len), q_len, total)
    history_mask = exact_mask = None
    if mask is not None:  # storage order: sink | history | recent and new
        mask = mask[:, 0].expand(bsz, q_len, total)
        history_mask = mask[..., n_sink : n_sink + history]
        exact_mask = torch.cat([mask[..., :n_sink], mask[..., n_sink + history :]], -1)
    call = backends.DecodeCall(query, layer.streams["keys"], layer.streams["values"], history, key, value,
                               history_mask, exact_mask, dim**-0.5 if scaling is None else scaling, softcap,
                               layer.exact_rows)
    return backends.choose(call).attend(call), None


def _attention_for(kernel_name: str):
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = getattr(key, "_kvhub_layer", None)
        if layer is None:
            return _kernel(kernel_name, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return attend(layer, query, key, value, attention_mask, scaling, kwargs.get("softcap"))

    forward.__name__ = f"{PREFIX}{kernel_name}"
    return forward


def register(kernel_name: str) -> str:
    """Make ``attn_implementation="kvhub_<kernel_name>"`` known to transformers (attention and mask functions)."""
    name = f"{PREFIX}{kernel_name}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _attention_for(kernel_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[kernel_name])
    return name


_SWITCH = threading.Lock()


def enable(model) -> str:
    """Switch ``model`` to compressed attention until the matching :func:`disable`, for scripts that run one model
    through many caches (benchmarks). Returns the user's kernel name. Calls nest and may come from several threads:
    the model keeps compressed attention until every :func:`enable` has had its :func:`disable`. Prefer ``with
    compressed_attention(model):``."""
    with _SWITCH:
        users = model.__dict__.get("_kvhub_switch_users", 0)
        kernel = model.config._attn_implementation or "eager"
        if users == 0:  # the kernel to give back: none where the model was made with a kvhub kernel
            model.__dict__["_kvhub_switch_restore"] = None if is_compressed_attention(kernel) else kernel
            if not is_compressed_attention(kernel):
                model.set_attn_implementation(register(kernel))
        model.__dict__["_kvhub_switch_users"] = users + 1
        return kernel.removeprefix(PREFIX)


def disable(model) -> None:
    """Give ``model`` its own kernel back once the last :func:`enable` is matched."""
    with _SWITCH:
        users = model.__dict__.get("_kvhub_switch_users", 0)
        model.__dict__["_kvhub_switch_users"] = max(0, users - 1)
        restore = model.__dict__.get("_kvhub_switch_restore")
        if users <= 1 and restore is not None:
            model.set_attn_implementation(restore)
            model.__dict__["_kvhub_switch_restore"] = None


@contextmanager
def compressed_attention(model) -> Iterator:
    """Within the block, attention of layers with compressed history reads the codes; everything else runs the
    model's own kernel. The model's attention implementation is restored when the last block over it exits (also
    on error)."""
    enable(model)
    try:
        yield model
    finally:
        disable(model)
