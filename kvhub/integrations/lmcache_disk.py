"""LMCache's own storage path on a local folder, without a server or a GPU: to measure and test a serde offline.

A :class:`DiskStore` is an LMCache ``StorageManager`` (L1 in CPU memory) with one ``fs`` L2 adapter wrapped in a
serde. ``put`` writes chunks into L1 and waits until LMCache's store controller has serialized them and the ``fs``
adapter has written them to disk; ``evict`` drops them from L1; ``get`` prefetches them from disk (deserializing)
back into L1 and reads them. These are the calls vLLM's LMCache connector makes, minus the GPU copies.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, ObjectKey, PrefetchTaskSpec
from lmcache.v1.distributed.config import parse_args
from lmcache.v1.distributed.internal_api import L2AdapterListener
from lmcache.v1.distributed.storage_manager import StorageManager

from ..errors import KVHubError
from . import lmcache as _registers_kvhub_serde  # noqa: F401  (the 'kvhub' serde type must exist before use)


class _Stored(L2AdapterListener):
    """Collects the keys (and byte sizes) the L2 adapter reports stored, so ``put`` can wait for them."""

    def __init__(self) -> None:
        self.sizes: dict[ObjectKey, int] = {}
        self.changed = threading.Condition()

    def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        with self.changed:
            self.sizes.update(zip(keys, sizes))
            self.changed.notify_all()

    def on_l2_keys_accessed(self, keys: list[ObjectKey]) -> None:
        pass

    def on_l2_keys_deleted(self, keys: list[ObjectKey]) -> None:
        pass


def _served_model(serde: dict[str, Any] | None) -> str:
    """The model name keys carry by default: the one a kvhub serde expects (its ``model``, else its preset's model),
    as an engine serving that model would name it; "kvhub" for any other serde."""
    if serde is None or serde.get("type") != "kvhub":
        return "kvhub"
    from ..preset import KVPreset

    return serde.get("model") or KVPreset.from_pretrained(serde["preset"], revision=serde.get("revision")).base_model["id"]


class DiskStore:
    """``DiskStore(folder, serde={"type": "kvhub", "preset": ...})``; ``serde=None`` stores the raw chunks."""

    def __init__(self, folder: str | Path, serde: dict[str, Any] | None, model_name: str | None = None,
                 l1_gb: float = 0.5, timeout_s: float = 120.0) -> None:
        adapter: dict[str, Any] = {"type": "fs", "base_path": str(folder), "relative_tmp_dir": "tmp"}
        if serde is not None:
            adapter["serde"] = serde
        self.folder = Path(folder)
        self.model_name = model_name or _served_model(serde)
        self.timeout_s = timeout_s
        self.manager = StorageManager(parse_args(["--l1-size-gb", str(l1_gb), "--eviction-policy", "LRU",
                                                  "--l2-adapter", json.dumps(adapter)]))
        self.stored = _Stored()
        self.manager.register_l2_listener(self.stored)

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.manager.close()

    def key(self, chunk: torch.Tensor, tag: bytes = b"", rank: int = 0, world: int = 1) -> ObjectKey:
        """A content-hash key, as LMCache makes one: no position, the TP rank packed into ``kv_rank``."""
        digest = hashlib.sha256(tag + chunk.contiguous().view(torch.uint8).numpy().tobytes()).digest()[:16]
        return ObjectKey(chunk_hash=digest, model_name=self.model_name,
                         kv_rank=ObjectKey.ComputeKVRank(world, rank, world, rank))

    def put(self, chunks: list[torch.Tensor], keys: list[ObjectKey]) -> dict[ObjectKey, int]:
        """Store same-shaped chunks under ``keys``; wait until each is on disk; return the bytes written per key."""
        layout = MemoryLayoutDesc(shapes=[chunks[0].shape], dtypes=[chunks[0].dtype])
        objs = self.manager.reserve_write(keys, layout)
        if len(objs) != len(keys):
            raise KVHubError(f"LMCache reserved {len(objs)} of {len(keys)} chunks in L1; fix: raise l1_gb")
        for k, chunk in zip(keys, chunks):
            objs[k].tensor.copy_(chunk)
        self.manager.finish_write(keys)
        with self.stored.changed:
            if not self.stored.changed.wait_for(lambda: all(k in self.stored.sizes for k in keys), self.timeout_s):
                raise KVHubError(f"LMCache stored {sum(k in self.stored.sizes for k in keys)} of {len(keys)} chunks "
                                 f"within {self.timeout_s:.0f} s; fix: see LMCache's log for the serde error")
            return {k: self.stored.sizes[k] for k in keys}

    def evict(self, keys: list[ObjectKey]) -> None:
        """Drop the chunks from L1 memory, so reading them must go to disk. The store controller may still hold a
        read lock for a moment after the adapter reports a chunk stored, so locked chunks are retried, never forced."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            _, locked = self.manager.delete_l1_keys(keys)  # idempotent: keys already gone are a no-op
            if not locked:
                return
            if time.monotonic() > deadline:
                raise KVHubError(f"{locked} of {len(keys)} chunks stayed locked in L1 for {self.timeout_s:.0f} s")
            time.sleep(0.01)

    def get(self, keys: list[ObjectKey], shape: torch.Size, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Prefetch ``keys`` from disk into L1 and read them (copies); None if any could not be loaded, as when
        the serde refuses a chunk."""
        layout = MemoryLayoutDesc(shapes=[shape], dtypes=[dtype])
        spec = PrefetchTaskSpec(key_groups=[GroupedObjectKeys(keys=keys, object_group_id=0, layout_desc=layout)],
                                fetching_policy="full")
        handle = self.manager.submit_prefetch_task(spec)
        if not self.manager.wait_prefetch_status(handle, self.timeout_s):
            raise KVHubError(f"LMCache's prefetch did not finish within {self.timeout_s:.0f} s")
        result = self.manager.query_prefetch_status(handle)
        hit = [keys[i] for i in result.hit_cells[0].get_indices_list()] if result is not None else []
        if len(hit) != len(keys):
            if hit:  # release the read locks the prefetch took on the chunks it did load
                self.manager.finish_read_prefetched(hit, l1_owners=result.l1_owners)
            return None
        with self.manager.read_prefetched_results(keys, result.l1_owners) as objs:
            out = None if objs is None else [o.tensor.clone() for o in objs]
        if out is not None:
            self.manager.finish_read_prefetched(keys, l1_owners=result.l1_owners)
        return out
