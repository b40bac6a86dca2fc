"""The preset format: round trip, and every kind of bad input rejected with a typed, one-line error."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

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
from kvhub.errors import PresetWriteError
from kvhub.preset import BASES_NAME, CONFIG_NAME
from kvhub.preset_files import sha256_file
from kvhub.recipe import Recipe, import_legacy_preset
from tests.paths import BOOKS_TUNED, PRESETS, ROOT
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


@pytest.fixture
def offline_cli(monkeypatch, tmp_path, capsys):
    """The CLI in-process, offline with an empty Hub cache: names resolve through the packaged registry."""
    from huggingface_hub import constants

    from kvhub.cli import main
    from tests.hub_server import isolate_hf_env

    isolate_hf_env(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_validate_and_show_take_a_folder_its_config_or_a_model_name(saved, offline_cli):
    for command in ("validate", "show"):
        for preset in (str(saved / CONFIG_NAME), "smollm2"):
            code, _, err = offline_cli(command, preset)
            assert code == 0, (command, preset, err)
    assert offline_cli("validate", "smollm2")[1].startswith(
        "ok: smollm2 is a valid kvhub preset for HuggingFaceTB/SmolLM2-135M-Instruct (30 layers, ")
    code, _, err = offline_cli("validate", str(saved / BASES_NAME))
    assert code == 1 and err.strip().splitlines() == [
        f"error: {saved / BASES_NAME}: not a preset; fix: pass a preset folder or its {CONFIG_NAME}, a Hub repo id or "
        "a model name"]


def test_show_names_scale_storage_and_levels_with_a_legend(saved, offline_cli):
    shown = offline_cli("show", str(BOOKS_TUNED))[1]
    assert "64x4b token/log8" in shown and "32x4b+32x2b rms/log8 lloyd-max" in shown
    assert "/log8: each scale stored in one byte" in shown and "lloyd-max: non-uniform levels" in shown
    tiny = offline_cli("show", str(saved))[1]  # uniform levels, fp16 scales: no legend for either
    assert "12x8b token " in tiny and "log8" not in tiny and "lloyd-max" not in tiny
    # a code of its own for the keys' 2-bit tails: named in the row, its words in the legend, and in the model card
    tails = ROOT / "benchmarks" / "presets" / "smollm2-3pct-key-tails"
    shown = offline_cli("show", str(tails))[1]
    assert "32x4b+32x2b token/log8, 2b rms vq" in shown and "rms: per-token RMS scale" in shown
    assert "32x4b+32x2b (token, log8 scales, 2-bit: rms vq)" in (tails / "README.md").read_text()
    # the bundled preset: keys before RoPE and secondary sinks say which backends decode them
    shown = offline_cli("show", str(PRESETS / "HuggingFaceTB--SmolLM2-135M-Instruct"))[1]
    assert "4x8b+36x4b+24x2b token/log8, 2b rms vq" in shown and "32x4b+32x2b rms/log8 vq" in shown
    assert "keys coded before RoPE" in shown and "scored on the PyTorch backend" in shown


def test_list_explains_the_needle_column(offline_cli):
    code, out, _ = offline_cli("list")
    assert code == 0 and "0.73 / 0.73" in out
    assert "needle: passkeys retrieved with the preset / with the uncompressed cache (DynamicCache)" in out


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


# --- hostile inputs (issue 12): each class refused with a typed one-line error, fast -----------------------------------
MB = 1 << 20
RAW = "@@raw@@"  # placeholder for a JSON literal json.dumps cannot write (NaN, a 5000-digit integer, deep nesting)


def with_raw(folder, path, literal):
    """Set the config field at ``path`` to the raw JSON text ``literal``."""
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = RAW
    (folder / CONFIG_NAME).write_text(json.dumps(cfg).replace(json.dumps(RAW), literal))


def set_field(path, value):
    return lambda f: with_raw(f, path, json.dumps(value))


def splice_top(f, member):
    text = (f / CONFIG_NAME).read_text().rstrip()
    (f / CONFIG_NAME).write_text(text[:-1] + ", " + member + "}")


HOSTILE_CONFIGS = {
    "NaN literal": (lambda f: with_raw(f, ("calibration", "tokens"), "NaN"), "NaN is not a number JSON allows"),
    "Infinity literal": (lambda f: with_raw(f, ("base_model", "head_dim"), "-Infinity"), "-Infinity is not a number"),
    "1e999 overflows": (lambda f: with_raw(f, ("calibration", "tokens"), "1e999"), "overflows to infinity"),
    "5000-digit integer": (lambda f: with_raw(f, ("codec", "num_layers"), "9" * 5000), "integer of 5000 digits"),
    "100,000-deep array": (lambda f: with_raw(f, ("calibration", "tuning"), "[" * 100_000 + "]" * 100_000),
                           "nesting deeper than 32 levels"),
    "1 MB deep array": (lambda f: with_raw(f, ("calibration", "tuning"), "[" * (MB // 2 - 3000) + "]" * (MB // 2 - 3000)),
                        "nesting deeper than 32 levels"),
    "duplicate key": (lambda f: splice_top(f, '"schema_version": "1.0"'), 'duplicate key "schema_version"'),
    "lone surrogate": (lambda f: with_raw(f, ("base_model", "provenance"), '"a\\ud800b"'), r"lone surrogate \\ud800"),
    "over 1 MB": (set_field(("base_model", "provenance"), "x" * MB), "more than the 1048576 allowed"),
    "200k schema violations": (lambda f: with_raw(f, ("calibration", "tuning"), "[" + ",".join(["{}"] * 200_000) + "]"),
                               "an array of 200000 items"),
    "200k keys": (lambda f: with_raw(f, ("codec", "layers"), "{" + ",".join(f'"{i}":0' for i in range(90_000)) + "}"),
                  "an object of 90000 items"),
    "1 MB wrong-typed value": (set_field(("base_model", "head_dim"), "x" * (MB - 4000)), "is not of type 'integer'"),
    "num_layers 1e9": (set_field(("codec", "num_layers"), 10**9), "greater than the maximum of 1024"),
    "num_layers disagrees": (set_field(("codec", "num_layers"), 3), "codec.num_layers is 3 but base_model.num_hidden_layers is 2"),
    "layer key 01": (lambda f: edit_config(f, lambda c: c["codec"].update(layers={"01": c["codec"]["default"]})),
                     "'01' does not match"),
    "layer override past the end": (lambda f: edit_config(f, lambda c: c["codec"].update(layers={"7": c["codec"]["default"]})),
                                    "codec.layers has the key '7'"),
    "code in base_model.id": (set_field(("base_model", "id"), 'x")\nimport os; os.system("id")  #'), "does not match"),
    "repo id with --": (set_field(("base_model", "id"), "a--b/c"), "not a Hub repo id"),
    "ESC in schema_version": (set_field(("schema_version",), "\x1b[2J\x1b]0;PASS\x07"), "is not supported"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_config_is_refused_fast_with_one_line(copy, case):
    mutate, message = HOSTILE_CONFIGS[case]
    mutate(copy)
    start = time.perf_counter()
    with pytest.raises(PresetFormatError, match=message) as info:
        KVPreset.load_folder(copy)
    assert time.perf_counter() - start < 1.0, "kvhub validate must answer a config under 1 MB in under a second"
    text = str(info.value)
    assert "fix:" in text and "\n" not in text and len(text) < 600
    r = cli("validate", str(copy))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and len(r.stderr) < 1000 and "\x1b" not in r.stderr


def raw_safetensors(folder, header_text, payload):
    """Write the bases file from a header text and its data, and fix up the config's checksum and size."""
    path = folder / BASES_NAME
    hb = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + payload)
    edit_config(folder, lambda c: c["files"][0].update(sha256=sha256_file(path), size=path.stat().st_size))


def header_of(folder):
    data = (folder / BASES_NAME).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].decode().rstrip(), data[8 + n :]


def duplicate_tensor_entry(f):
    header, payload = header_of(f)
    entry = json.loads(header)["layers.0.keys.mean"]
    raw_safetensors(f, header[:-1] + ', "layers.0.keys.mean": ' + json.dumps(entry) + "}", payload)


def hundred_thousand_tensors(f):
    header = {f"layers.0.keys.x{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(100_000)}
    raw_safetensors(f, json.dumps(header), bytes(400_000))


def huge_header_length(f):
    path = f / BASES_NAME
    path.write_bytes(struct.pack("<Q", 2**63) + path.read_bytes()[8:])
    edit_config(f, lambda c: c["files"][0].update(sha256=sha256_file(path)))


def renamed(t, old, new):
    return {(new if k == old else k): v for k, v in t.items()}


HOSTILE_TENSORS = {
    "mean of 3e38": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.0.keys.mean": torch.full((2, 16), 3e38)}),
                     PresetTensorError, r"layer 0 keys: decoded vectors can reach a norm of .*, beyond 9.22337e\+18"),
    "negative variance": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.1.values.variance": -t["layers.1.values.variance"]}),
                          PresetTensorError, "layer 1 values: variance has a negative value"),
    "extra 64 MB tensor": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.0.keys.extra": torch.zeros(16 * MB)}),
                           PresetTensorError, "more than the .* its codec's tensors can take"),
    "extra tensor": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.0.keys.extra": torch.zeros(1)}),
                     PresetTensorError, "unexpected tensor 'layers.0.keys.extra'"),
    "tensor of a layer the model lacks": (lambda f: rewrite_tensors(f, lambda t: {**t, "layers.7.keys.mean": torch.zeros(2, 16)}),
                                          PresetTensorError, "unexpected tensor 'layers.7.keys.mean'"),
    "layers.01 for layers.1": (lambda f: rewrite_tensors(f, lambda t: renamed(t, "layers.1.keys.mean", "layers.01.keys.mean")),
                               PresetTensorError, "unexpected tensor 'layers.01.keys.mean'"),
    "fullwidth digit": (lambda f: rewrite_tensors(f, lambda t: renamed(t, "layers.1.keys.mean", "layers.\uff11.keys.mean")),
                        PresetTensorError, "unexpected tensor 'layers.\uff11.keys.mean'"),
    "100k tensors": (hundred_thousand_tensors, PresetTensorError, "more than the .* its codec's tensors can take"),
    "duplicate tensor in the header": (duplicate_tensor_entry, PresetFileError, 'duplicate key "layers.0.keys.mean"'),
    "header of 2**63 bytes": (huge_header_length, PresetFileError, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TENSORS))
def test_hostile_tensor_file_is_refused_with_one_line(copy, case):
    mutate, error, message = HOSTILE_TENSORS[case]
    mutate(copy)
    start = time.perf_counter()
    with pytest.raises(error, match=message) as info:
        KVPreset.load_folder(copy)
    assert time.perf_counter() - start < 1.0
    assert "fix:" in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 600


def test_largest_allowed_mean_keeps_logits_finite(model, copy):
    """The magnitude bound is the one that keeps attention finite: bases at the bound still give finite logits."""
    rewrite_tensors(copy, lambda t: {k: (torch.full_like(v, 65504.0) if k.endswith(".mean") else v) for k, v in t.items()})
    preset = KVPreset.load_folder(copy)
    ids = torch.randint(3, VOCAB, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, cache=preset.build_cache(model), use_cache=True).logits
    assert torch.isfinite(logits).all()


# --- links -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [BASES_NAME, CONFIG_NAME])
def test_link_leaving_the_folder_is_refused(copy, tmp_path, name):
    outside = tmp_path / "outside" / name
    outside.parent.mkdir()
    shutil.move(copy / name, outside)
    (copy / name).symlink_to(outside)
    with pytest.raises(PresetFileError, match="links outside the preset folder"):
        KVPreset.load_folder(copy)
    r = cli("validate", str(copy))
    assert r.returncode == 1 and "links outside the preset folder" in r.stderr


def test_preset_files_refuses_a_card_linked_outside(copy, tmp_path):
    (tmp_path / "secret.txt").write_text("token")
    (copy / "README.md").unlink()
    (copy / "README.md").symlink_to(tmp_path / "secret.txt")
    preset = KVPreset.load_folder(copy)  # the card is not needed to load, but nothing may publish it
    with pytest.raises(PresetFileError, match="README.md: links outside the preset folder"):
        preset.preset_files()


def test_links_inside_the_folder_and_into_a_hub_cache_are_followed(copy, tmp_path):
    shutil.move(copy / BASES_NAME, copy / "store.bin")
    (copy / BASES_NAME).symlink_to("store.bin")
    assert KVPreset.load_folder(copy).preset_files()[BASES_NAME] == (copy / "store.bin").resolve()
    repo = tmp_path / "models--test--tiny"  # the Hugging Face cache: snapshots/<commit>/name -> ../../blobs/<sha>
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in (CONFIG_NAME, "store.bin", "README.md"):
        shutil.copy(copy / name, repo / "blobs" / name)
    (snapshot / CONFIG_NAME).symlink_to(f"../../blobs/{CONFIG_NAME}")
    (snapshot / BASES_NAME).symlink_to("../../blobs/store.bin")
    files = KVPreset.load_folder(snapshot).preset_files()
    assert set(files) == {CONFIG_NAME, BASES_NAME} and all(p.parent == (repo / "blobs").resolve() for p in files.values())


# --- text reaching a card, a report or a terminal ----------------------------------------------------------------------
INJECTION = ('<!-- hidden\n# PASS\n[click](javascript:alert(1)) <img src=x onerror=alert(1)> **bold** `tick` | cell | '
             '\x1b]8;;http://evil\x07link\x1b]8;;\x07 \x1b[2J \u202egnp.exe')


def _html(markdown_text):
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown_text)


def test_card_escapes_every_config_text(saved, tmp_path):
    import yaml

    preset = KVPreset.load_folder(saved)
    preset.config["base_model"]["provenance"] = "a wheel"
    preset.config["metrics"] = metrics_with(hardware="x86_64 CPU", corpus="austen_emma", command="kvhub eval p")
    benign = _html(model_card_of(preset))
    preset.config["base_model"]["provenance"] = INJECTION
    preset.config["calibration"]["corpus"] = "x` <b>y</b> ``"
    preset.config["metrics"] = metrics_with(hardware=INJECTION, corpus='a"\nevil: true', command="run `x` <!--")
    preset.save_pretrained(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    html = _html(card)
    for tag in ("<!--", "<img", "<a ", "<b>", "<strong>", "<em>", "<h1>", "<h2>", "<table>", "<tr>", "<code>", "\x1b", "\u202e"):
        assert html.count(tag) == benign.count(tag), tag  # the same structure as an honest card: nothing injected
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["model-index"][0]["results"][0]["dataset"]["name"] == 'a"\nevil: true' and "evil" not in front


def test_card_refuses_code_in_the_model_id(model, saved, tmp_path):
    preset = KVPreset.load_folder(saved)
    preset.config["base_model"]["id"] = 'x")\nimport os; os.system("id")  #'
    with pytest.raises(PresetFormatError, match="base_model.id"):
        preset.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_show_and_validate_print_no_control_characters(copy):
    edit_config(copy, lambda c: c["base_model"].update(provenance=INJECTION))
    r = cli("show", str(copy))
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\x07" not in r.stdout
    assert "weights: <!-- hidden\\x0a# PASS" in r.stdout and "\\x1b]8;;http://evil" in r.stdout
    r = cli("validate", str(copy))
    assert r.returncode == 0 and r.stdout.count("\n") == 1


def test_verify_report_cannot_forge_a_verdict():
    from kvhub.registry_tools.verify import VerifyReport

    report = VerifyReport(preset="p`\n### kvhub registry verify: PASS\n<!--", base_model="a<!--", model="m",
                          hardware=INJECTION, command="kvhub `x` <!--")
    report.add("preset files", False, "bad | x\n### PASS <!--", claimed="<b>1</b>", measured="2")
    html = _html(report.to_markdown())
    assert html.count("<h3>") == 1 and "FAIL" in html.split("</h3>")[0] and "<!--" not in html
    assert html.count("<tr>") == 2 and "<b>" not in html  # the header row and the one check


def model_card_of(preset):
    from kvhub.card import model_card

    return model_card(preset.config)


def metrics_with(hardware, corpus, command):
    return {"context_length": 64, "compression": {"keys": 2.0, "values": 3.0, "total": 2.5},
            "perplexity": {"corpora": {corpus: {"base": 10.0, "compressed": 10.1, "delta_pct": 1.0}},
                           "mean_delta_pct": 1.0, "windows": 1, "window_tokens": 64, "chunk": 16},
            "eval_corpus": corpus, "eval_corpus_sha256": "0" * 64, "hardware": hardware, "date": "2026-11-29",
            "kvhub_version": "0.1.0", "command": command}


# --- saving: atomic for readers, only the preset's own files, normal permissions, typed errors ---------------------------
@pytest.fixture(scope="module")
def two_presets(model, saved):
    """The saved preset and another one for the same model (other bases and codec), to overwrite each other."""
    a = KVPreset.load_folder(saved)
    codec = CacheCodec.uniform(ModelShape.from_config(model.config), 4, 8, key_rank=8, value_rank=16)
    b = KVPreset.create(model.config, codec, tiny_bases(model, seed=2), CAL, "test/tiny-llama")
    return a, b


def test_readers_never_see_a_mixed_preset_during_overwrites(two_presets, tmp_path):
    a, b = two_presets
    folder = tmp_path / "p"
    a.save_pretrained(folder)
    digests = {json.loads((folder / CONFIG_NAME).read_text())["files"][0]["sha256"]}
    failures, reads, done = [], [0], threading.Event()

    def reader():
        while not done.is_set():
            try:
                p = KVPreset.load_folder(folder)
                assert p.config["files"][0]["sha256"] in digests or p.config["codec"] in (a.config["codec"], b.config["codec"])
                reads[0] += 1  # not atomic across threads, but only checked > 0
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL over often, so readers run during every step of every save
    for thread in threads:
        thread.start()
    try:
        for i in range(50):
            (b if i % 2 == 0 else a).save_pretrained(folder, overwrite=True)
    finally:
        done.set()
        for thread in threads:
            thread.join()
        sys.setswitchinterval(interval)
    assert failures == [] and reads[0] > 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, BASES_NAME, "README.md"])


@pytest.mark.parametrize("crash_at", range(1, 6))
def test_a_save_killed_at_any_rename_leaves_a_loadable_preset(two_presets, tmp_path, monkeypatch, crash_at):
    a, b = two_presets
    folder = tmp_path / "p"
    a.save_pretrained(folder)
    (folder / "recipe.json").write_text("{}")
    real_replace, calls = os.replace, [0]

    def crashing_replace(src, dst):
        calls[0] += 1
        if calls[0] == crash_at:
            raise OSError(5, "Input/output error (simulated crash)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(PresetWriteError, match="could not write the preset"):
        b.save_pretrained(folder, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    loaded = KVPreset.load_folder(folder)  # the old preset, or (past the config swap) the new one, never a mix
    assert loaded.config["codec"] in (a.config["codec"], b.config["codec"])
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".kvhub-")]
    b.save_pretrained(folder, overwrite=True)  # the next save cleans what the crash left
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, BASES_NAME, "README.md", "recipe.json"])
    assert KVPreset.load_folder(folder).config["codec"] == b.config["codec"]


def test_overwrite_keeps_unrelated_files(saved, tmp_path):
    folder = tmp_path / "presets" / "m"
    shutil.copytree(saved, folder)
    (folder / "thesis.tex").write_text("\\section{Years of work}")
    (folder / "recipe.json").write_text('{"target_ppl_delta": 0.01}')
    (folder / "notes").mkdir()
    KVPreset.load_folder(folder).save_pretrained(folder, overwrite=True)
    assert (folder / "thesis.tex").read_text() == "\\section{Years of work}"
    assert (folder / "recipe.json").read_text() == '{"target_ppl_delta": 0.01}' and (folder / "notes").is_dir()


def test_saved_files_have_normal_permissions(saved, tmp_path):
    old = os.umask(0o022)
    try:
        KVPreset.load_folder(saved).save_pretrained(tmp_path / "new" / "p")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "p").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "new" / "p").iterdir()} == {
        CONFIG_NAME: 0o644, BASES_NAME: 0o644, "README.md": 0o644}


def test_write_errors_are_typed(saved, tmp_path, monkeypatch):
    preset = KVPreset.load_folder(saved)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PresetWriteError, match="exists and is not a folder"):
        preset.save_pretrained(tmp_path / "file")
    with pytest.raises(PresetWriteError, match="could not write the preset"):  # NotADirectoryError underneath
        preset.save_pretrained(tmp_path / "file" / "p")
    target = tmp_path / "full"
    preset.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(PresetWriteError, match="No space left on device"):
        preset.save_pretrained(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# --- 16-bit bases (format 1.1) -----------------------------------------------------------------------------------------
def test_new_presets_store_fp16_basis_and_fp32_mean_and_variance(saved):
    from safetensors import safe_open

    with safe_open(str(saved / BASES_NAME), framework="pt") as f:
        dtypes = {k.rsplit(".", 1)[1]: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"basis": "F16", "mean": "F32", "variance": "F32"}
    assert json.loads((saved / CONFIG_NAME).read_text())["schema_version"] == "1.1"


def test_a_format_1_0_preset_still_loads_and_stays_fp32(tmp_path):
    bundled = ROOT / "benchmarks" / "presets" / "smollm2-1pct-fp16"  # the bundled preset as tuned, before log8 scales
    assert json.loads((bundled / CONFIG_NAME).read_text())["schema_version"] == "1.0"
    preset = KVPreset.load_folder(bundled)
    assert preset.basis_dtype == "F32"
    preset.save_pretrained(tmp_path / "p")  # e.g. kvhub eval --write-metrics: the bases it measured stay as they were
    a, b = load_file(bundled / BASES_NAME), load_file(tmp_path / "p" / BASES_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_bases_move_logits_far_less_than_the_codec_does(model):
    """Measured on the tiny model: rounding the basis to fp16 changes decode logits by a small fraction of what the
    codec itself changes (K 8-bit, V 4-bit), and by < 1e-3 with a 16-bit codec (logit std is ~0.16)."""
    from transformers import DynamicCache

    from kvhub.cache import CompressedCache

    def decode(make_cache, ids, prefill=40):
        cache = make_cache()
        out = [model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits[:, -1]]
        for t in range(prefill, ids.shape[1]):
            out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1])
        return torch.cat(out)

    shape = ModelShape.from_config(model.config)
    ids = torch.randint(3, VOCAB, (1, 72), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = decode(DynamicCache, ids)
        for bits, bound in ((8, None), (16, 1e-3)):
            codec = CacheCodec.uniform(shape, bits, bits // 2 if bits == 8 else 16, window=0, sink=0)
            b32 = tiny_bases(model).rotated_for(codec, shape)
            l32 = decode(lambda: CompressedCache(model.config, codec, b32), ids)
            l16 = decode(lambda: CompressedCache(model.config, codec, b32.rounded(torch.float16)), ids)
            fp16_effect = (l16 - l32).abs().max().item()
            assert fp16_effect < (bound if bound else 0.25 * (l32 - exact).abs().max().item())


# --- fuzz: hostile classes (issue 12) ----------------------------------------------------------------------------------
_UNPRINTABLE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
HOSTILE_LITERALS = st.one_of(
    st.integers(33, 200_000).map(lambda d: "[" * d + "]" * d),  # deep nesting
    st.integers(21, 6000).map(lambda n: "9" * n),  # huge integers
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" + "0" * 70 + ".5"]),  # non-finite, long
    st.text(st.characters(categories=["Cs", "Cc", "Cf"]), min_size=1, max_size=6).map(lambda s: json.dumps("x" + s + "y")),
    st.integers(10_001, 30_000).map(lambda n: "[" + ",".join(["0"] * n) + "]"),  # huge arrays
)


def _objects(obj, path=()):
    if isinstance(obj, dict):
        yield path
        for k, v in obj.items():
            yield from _objects(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _objects(v, path + (i,))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(0, 10_000), literal=HOSTILE_LITERALS, dup=st.one_of(st.none(), st.integers(0, 10_000)))
def test_fuzzed_hostile_literals_are_refused_or_harmless(saved, tmp_path_factory, where, literal, dup):
    folder = tmp_path_factory.mktemp("hostile")
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    leaves = list(_leaves(cfg))
    *parents, last = leaves[where % len(leaves)]
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = RAW
    duplicated = None
    if dup is not None:  # the same key twice in one object
        objects = [p for p in _objects(cfg) if p and isinstance(p[-1], str)]
        obj = cfg
        for p in objects[dup % len(objects)]:
            obj = obj[p]
        duplicated = next(iter(obj))
        obj["@@dup@@"] = 0
    text = json.dumps(cfg).replace(json.dumps(RAW), literal)
    if duplicated is not None:
        text = text.replace('"@@dup@@"', json.dumps(duplicated))
    (folder / CONFIG_NAME).write_text(text)
    start = time.perf_counter()
    try:
        preset = KVPreset.load_folder(folder)
    except PresetError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
    else:  # only a string with control characters in a free-text field can be valid: it must not reach output raw
        from kvhub.cli.preset import describe

        assert duplicated is None and literal.startswith('"')
        assert not _UNPRINTABLE.search(describe(preset)) and not _UNPRINTABLE.search(model_card_of(preset))
    assert time.perf_counter() - start < 1.0


ODD_NAMES = st.one_of(
    st.builds("layers.{}.{}.{}".format,
              st.sampled_from(["0", "1", "01", "-1", "+1", " 1", "1 ", "\uff11", "\u0661", "1_0", "2", "7", "9" * 25]),
              st.sampled_from(["keys", "values", "Keys", "key", ""]), st.sampled_from(["mean", "basis", "variance", "bias", ""])),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=24),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=ODD_NAMES, rename=st.booleans(), victim=st.integers(0, 100))
def test_fuzzed_tensor_names_are_refused(saved, tmp_path_factory, name, rename, victim):
    folder = tmp_path_factory.mktemp("names")
    shutil.copytree(saved, folder, dirs_exist_ok=True)
    expected = set(load_file(folder / BASES_NAME))
    if name in expected or name == "__metadata__":
        return

    def mutate(t):
        old = sorted(t)[victim % len(t)]
        return renamed(t, old, name) if rename else {**t, name: torch.zeros(2, 16)}

    rewrite_tensors(folder, mutate)
    with pytest.raises((PresetTensorError, PresetFileError)):
        KVPreset.load_folder(folder)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([CONFIG_NAME, BASES_NAME, "README.md"]),
       target=st.sampled_from(["outside", "outside, absolute", "inside", "inside, then outside", "parent folder"]))
def test_fuzzed_links_never_let_a_file_outside_in(saved, tmp_path_factory, name, target):
    root = tmp_path_factory.mktemp("links")
    folder, elsewhere = root / "p", root / "elsewhere"
    shutil.copytree(saved, folder)
    elsewhere.mkdir()
    shutil.move(folder / name, elsewhere / name)
    leaves = True
    if target == "outside":
        (folder / name).symlink_to(Path("..") / "elsewhere" / name)
    elif target == "outside, absolute":
        (folder / name).symlink_to(elsewhere / name)
    elif target == "inside":
        shutil.move(elsewhere / name, folder / "kept.bin")
        (folder / name).symlink_to("kept.bin")
        leaves = False
    elif target == "inside, then outside":
        (folder / "hop").symlink_to(elsewhere / name)
        (folder / name).symlink_to("hop")
    else:
        shutil.move(elsewhere / name, root / name)
        (folder / name).symlink_to(Path("..") / name)
    try:
        files = KVPreset.load_folder(folder).preset_files()
    except PresetFileError as exc:
        assert leaves and "links outside the preset folder" in str(exc)
        return
    assert not leaves and all(p.parent == folder.resolve() for p in files.values())


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "not a JSON object"),
    ('{"model": "x", "rank": NaN}', "NaN is not a number"),
    ("[" * 50_000 + "]" * 50_000, "nesting deeper than 32"),
    (" " * (MB + 1), "more than the 1048576 allowed"),
])
def test_import_legacy_refuses_hostile_json(tmp_path, text, message):
    (tmp_path / "legacy.json").write_text(text)
    r = cli("import-legacy", str(tmp_path / "legacy.json"))
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_push_refuses_a_preset_whose_file_links_outside(local_hub, copy, tmp_path):
    from huggingface_hub import HfApi

    from kvhub.hub_presets import push_preset
    from tests.hub_server import DEFAULT_TOKEN

    (tmp_path / "secret.safetensors").write_bytes((copy / BASES_NAME).read_bytes())  # passes every content check
    (copy / BASES_NAME).unlink()
    (copy / BASES_NAME).symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(PresetFileError, match="links outside the preset folder"):
        push_preset(copy, "kvhub-test/linked", token=DEFAULT_TOKEN)
    assert not HfApi(endpoint=local_hub.endpoint).repo_exists("kvhub-test/linked", token=DEFAULT_TOKEN)
