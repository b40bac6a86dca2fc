"""The preset format: round trip, and every kind of bad input rejected with a typed, one-line error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from kvhub import (
    CacheCodec,
    KVPreset,
    ModelShape,
    PresetError,
    PresetExistsError,
    PresetFileError,
    PresetFormatError,
    PresetModelMismatchError,
    PresetTensorError,
)
from kvhub.preset import BASES_NAME, CONFIG_NAME, sha256_file
from kvhub.recipe import Recipe, import_legacy_preset
from tests.tiny_models import VOCAB, tiny_bases, tiny_model

CAL = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": 2}


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    m.config._name_or_path = "test/tiny-llama"
    return m


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    codec = CacheCodec.uniform(ModelShape.from_config(model.config), 8, 4, key_rank=12, value_rank=8)
    folder = tmp_path_factory.mktemp("preset") / "tiny"
    KVPreset.create(model.config, codec, tiny_bases(model), CAL, "test/tiny-llama").save_pretrained(folder)
    return folder


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "p"
    shutil.copytree(saved, dst)
    return dst


def edit_config(folder, fn):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    fn(cfg)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def rewrite_tensors(folder, fn, keep_checksum=False):
    """Replace the bases file by ``fn(tensors)`` and (unless asked not to) update the config's checksum."""
    path = folder / BASES_NAME
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "kvhub-bases/1", "base_model": "test/tiny-llama", "schema_version": "1.0"})
    if not keep_checksum:
        edit_config(folder, lambda c: c["files"][0].update(sha256=sha256_file(path), size=path.stat().st_size))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "kvhub.cli", *args], capture_output=True, text=True)


# --- round trip -----------------------------------------------------------------------------------------------------
def test_save_load_build_round_trips_bit_identically(model, saved, tmp_path):
    a = KVPreset.load_folder(saved)
    a.save_pretrained(tmp_path / "again")
    b = KVPreset.from_pretrained(tmp_path / "again")
    assert a.codec == b.codec and a.config["codec"] == b.config["codec"]
    ta, tb = load_file(saved / BASES_NAME), load_file(tmp_path / "again" / BASES_NAME)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = model(input_ids=ids, cache=a.build_cache(model), use_cache=True).logits
        lb = model(input_ids=ids, cache=b.build_cache(model), use_cache=True).logits
    assert torch.equal(la, lb)


def test_model_card_is_generated_from_config(saved):
    card = (saved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: kvhub\nbase_model: \"test/tiny-llama\"")
    assert "| 0 | 12x8b (token) | 8x4b (token) | 4 | 32 |" in card


def test_validate_cli_accepts_a_good_preset(saved):
    r = cli("validate", str(saved))
    assert r.returncode == 0 and "ok:" in r.stdout


def test_show_cli_prints_layers(saved):
    r = cli("show", str(saved))
    assert r.returncode == 0 and "test/tiny-llama" in r.stdout and "12x8b" in r.stdout


# --- bad input: one typed exception each, one CLI line ---------------------------------------------------------------
BAD = {
    "malformed JSON": (lambda f: (f / CONFIG_NAME).write_text("{not json"), PresetFormatError, "malformed JSON at line 1"),
    "missing field": (lambda f: edit_config(f, lambda c: c.pop("codec")), PresetFormatError, "'codec' is a required property"),
    "wrong type": (lambda f: edit_config(f, lambda c: c["base_model"].update(head_dim="16")), PresetFormatError,
                   "base_model.head_dim: '16' is not of type 'integer'"),
    "unknown schema_version": (lambda f: edit_config(f, lambda c: c.update(schema_version="9.0")), PresetFormatError,
                               "schema_version '9.0' is not supported"),
    "unexpected field": (lambda f: edit_config(f, lambda c: c.update(extra=1)), PresetFormatError,
                         "Additional properties are not allowed ('extra' was unexpected)"),
    "bad bits": (lambda f: edit_config(f, lambda c: c["codec"]["default"]["keys"].update(segments=[[16, 3]])),
                 PresetFormatError, "codec.default.keys.segments.0.1: 3 is not one of [0, 2, 4, 8, 16]"),
    "checksum mismatch": (lambda f: edit_config(f, lambda c: c["files"][0].update(sha256="a" * 64)), PresetFileError,
                          "does not match kvhub_preset.json"),
    "missing tensor file": (lambda f: (f / BASES_NAME).unlink(), PresetFileError, "listed in kvhub_preset.json but missing"),
    "truncated tensor file": (lambda f: (f / BASES_NAME).write_bytes((f / BASES_NAME).read_bytes()[:500]), PresetFileError,
                              "truncated or replaced"),
    "missing tensor": (lambda f: rewrite_tensors(f, lambda t: {k: v for k, v in t.items() if k != "layers.1.values.basis"}),
                       PresetTensorError, "tensor 'layers.1.values.basis' is missing"),
    "wrong shape": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.0.keys.mean": torch.zeros(2, 8)}),
                    PresetTensorError, "layer 0 keys: mean is 2x8 but the model and codec need 2x16"),
    "wrong dtype": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.0.keys.mean": torch.zeros(2, 16, dtype=torch.int32)}),
                    PresetTensorError, "has dtype I32"),
    "NaN": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.0.values.variance": torch.full((2, 8), float("nan"))}),
            PresetTensorError, "layer 0 values: variance contains NaN or Inf"),
    "not orthonormal": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.1.keys.basis": t["layers.1.keys.basis"] * 1.1}),
                        PresetTensorError, "layer 1 keys: basis is not orthonormal"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_rejected_with_one_line(copy, case):
    mutate, error, message = BAD[case]
    mutate(copy)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")) as info:
        KVPreset.from_pretrained(copy)
    assert "fix:" in str(info.value) and "\n" not in str(info.value)
    r = cli("validate", str(copy))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corrupted_tensor_file_with_matching_checksum_is_rejected(copy):
    path = copy / BASES_NAME
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF  # the header length: safetensors cannot parse it
    path.write_bytes(bytes(data))
    edit_config(copy, lambda c: c["files"][0].update(sha256=sha256_file(path)))
    with pytest.raises(PresetFileError, match="not a readable safetensors file"):
        KVPreset.from_pretrained(copy)


def test_preset_for_another_model_is_rejected(saved):
    preset = KVPreset.load_folder(saved)
    other = tiny_model("qwen2-mixed")  # 4 layers instead of 2
    with pytest.raises(PresetModelMismatchError, match="base_model.num_hidden_layers is 2 but the model has 4"):
        preset.build_cache(other)


def test_name_mismatch_needs_explicit_override(model, saved):
    preset = KVPreset.load_folder(saved)
    model.config._name_or_path = "someone/other-model"
    try:
        with pytest.raises(PresetModelMismatchError, match="base_model.id is 'test/tiny-llama' but the model is 'someone/other-model'"):
            preset.build_cache(model)
        assert preset.build_cache(model, allow_name_mismatch=True) is not None
    finally:
        model.config._name_or_path = "test/tiny-llama"


def test_saving_into_non_empty_folder_needs_overwrite(saved, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    preset = KVPreset.load_folder(saved)
    with pytest.raises(PresetExistsError, match="folder is not empty; fix: choose an empty folder or pass overwrite=True"):
        preset.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    preset.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(["keep.txt", CONFIG_NAME, BASES_NAME, "README.md"])
    assert (target / "keep.txt").read_text() == "x"


def test_failed_save_leaves_nothing_half_written(saved, tmp_path):
    preset = KVPreset.load_folder(saved)
    preset.config["metrics"] = {"context_length": "not a number"}  # fails validation after the tensors are written
    with pytest.raises(PresetFormatError):
        preset.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


# --- fuzz: only typed errors, never a crash or a silently wrong cache -------------------------------------------------
def _mutations():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.text(max_size=5), st.floats(allow_nan=True))
    return st.lists(st.tuples(st.integers(0, 10_000), scalars), min_size=1, max_size=4)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations())
def test_fuzzed_configs_raise_only_typed_errors(model, saved, tmp_path_factory, mutations):
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    leaves = list(_leaves(cfg))
    for index, value in mutations:
        *parents, last = leaves[index % len(leaves)]
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    try:
        preset = KVPreset.from_pretrained(folder)
    except PresetError:
        return
    cache = preset.build_cache(model, allow_name_mismatch=True)  # what loads must also build and run
    with torch.no_grad():
        model(input_ids=torch.randint(3, VOCAB, (1, 40)), cache=cache, use_cache=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8),
       fix_checksum=st.booleans())
def test_byte_flipped_tensor_files_raise_only_typed_errors(model, saved, tmp_path_factory, flips, fix_checksum):
    folder = tmp_path_factory.mktemp("flip")
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    path = folder / BASES_NAME
    original = path.read_bytes()
    data = bytearray(original)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    if bytes(data) == original:  # the flips cancelled out
        return
    path.write_bytes(bytes(data))
    if fix_checksum:  # an attacker or a bug that also rewrote the checksum: the content checks must still hold
        edit_config(folder, lambda c: c["files"][0].update(sha256=sha256_file(path)))
    try:
        preset = KVPreset.from_pretrained(folder)
    except PresetError:
        return
    assert fix_checksum  # without a matching checksum nothing may load
    cache = preset.build_cache(model)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, VOCAB, (1, 40)), cache=cache, use_cache=True).logits
    assert torch.isfinite(logits).all()


# --- recipes and the inherited format ---------------------------------------------------------------------------------
def test_legacy_preset_imports_as_a_recipe_that_needs_fitting(tmp_path):
    legacy = {"model": "Qwen/Qwen2.5-7B", "rank": 96, "target": "v", "bits": 8, "compression_ratio": 2.67,
              "total_compression": 1.45, "ppl_delta": 0.99}
    recipe = import_legacy_preset(legacy, source="qwen.json")
    assert recipe.value_rank == 96 and recipe.value_bits == 8 and not recipe.compress_keys
    assert "must be fitted" in recipe.notes and recipe.claimed["verified"] is False
    recipe.save(tmp_path / "recipe.json")
    assert Recipe.load(tmp_path) == recipe
    codec = recipe.codec(ModelShape(28, 4, 128))
    assert codec.layers[0].values.rank == 96 and codec.layers[0].keys.segments[0].bits == 16
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    r = cli("import-legacy", str(tmp_path / "legacy.json"))
    assert r.returncode == 0 and json.loads(r.stdout)["value_rank"] == 96 and "must be fitted" in r.stderr


def test_legacy_preset_missing_fields_is_rejected():
    with pytest.raises(PresetFormatError, match="missing bits, rank"):
        import_legacy_preset({"model": "x", "target": "v"})
