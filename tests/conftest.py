"""Shared fixtures: a local Hub over real HTTP with an isolated client environment, and a tiny preset to publish."""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernel tests (tests/test_kernels.py) run the kernels in Triton's CPU interpreter. The
# choice is made when triton is imported, and the imports below already import it (through torch._dynamo), so it
# is made here, first. Only code that runs Triton kernels is affected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import LocalHub, isolate_hf_env, running_hub
from tests.tiny_models import tiny_bases, tiny_model

TINY_MODEL_ID = "test/tiny-llama"
TINY_MODEL_REVISION = "0123456789abcdef0123456789abcdef01234567"


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Make ``endpoint`` the client's default, as ``HF_ENDPOINT`` does: in the environment (for subprocesses) and in
    ``huggingface_hub.constants`` (read at import; the file URL template must move with it, or file downloads keep
    going to the default host)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def fresh_process_lines(monkeypatch):
    """Each test starts with no one-per-process line said yet (kvhub.hub.say_once), as a new process would."""
    from kvhub import hub

    monkeypatch.setattr(hub, "_SAID", set())


@pytest.fixture
def local_hub(monkeypatch, tmp_path) -> Iterator[LocalHub]:
    """A LocalHub on 127.0.0.1 that the client uses by default, with its home, cache and token under ``tmp_path``,
    so no test can reach the real Hub."""
    isolate_hf_env(monkeypatch, tmp_path)
    with running_hub(tmp_path) as hub:
        use_endpoint(monkeypatch, hub.endpoint)
        yield hub


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random-weight Llama (head_dim 16): mechanics only, never quality."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_preset(tiny_llama, tmp_path_factory) -> Path:
    """A saved preset folder for ``tiny_llama`` (config, bases, card). Read-only: copy it before editing."""
    from kvhub.codec import CacheCodec, ModelShape
    from kvhub.preset import KVPreset

    codec = CacheCodec.uniform(ModelShape.from_config(tiny_llama.config), 8, 4, key_rank=12, value_rank=8)
    calibration = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": 2}
    preset = KVPreset.create(tiny_llama.config, codec, tiny_bases(tiny_llama), calibration, TINY_MODEL_ID,
                             revision=TINY_MODEL_REVISION)
    return preset.save_pretrained(tmp_path_factory.mktemp("presets") / "tiny-llama")
