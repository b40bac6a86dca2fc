"""The auto-tuner's mechanics on a tiny model: ladders, reallocation, and a search that verifies by measurement."""

from __future__ import annotations

import pytest
import torch

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvhub.cache import CompressedCache
from kvhub.codec import STREAMS, ModelShape
from kvhub.eval.ppl import perplexity
from kvhub.tuning import (LEVELS, Trial, domain_sensitivities, reallocate, search, sensitivities, stream_ladders,
                          tuning_summary)
from tests.test_registry import eval_text, model_dir  # noqa: F401  (session fixtures: the tiny model on disk)
from tests.tiny_models import VOCAB, tiny_bases


@pytest.mark.parametrize("key_tails", ["absmax", "rms"])
@pytest.mark.parametrize("quantizer", ["uniform", "lloyd-max", "vq"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ladders_are_valid_and_ordered_by_bits(head_dim, quantizer, key_tails):
    ladders = stream_ladders(head_dim, quantizer, key_tails=key_tails)
    for name in STREAMS:
        bits = [lay.bits_per_token() for lay in ladders[name]]
        assert bits == sorted(bits) and len(set(bits)) == len(bits)
        for lay in ladders[name]:
            lay.check(name, head_dim)
            assert lay.rank == head_dim  # no rank cuts
    level_bits = [ladders["keys"][k].bits_per_token() + ladders["values"][v].bits_per_token() for k, v in LEVELS]
    assert level_bits == sorted(level_bits) and len(set(LEVELS)) == len(LEVELS)
    # the chosen levels on every values layout but the one with an 8-bit segment (no Lloyd-Max table for 8 bits)
    assert [v.quantizer for v in ladders["values"]] == [quantizer] * (len(ladders["values"]) - 1) + ["uniform"]
    assert all(k.quantizer == "uniform" for k in ladders["keys"])


def test_reallocation_moves_least_sensitive_down_and_most_sensitive_up():
    ladders = stream_ladders(16)
    rungs = {(i, s): 2 for i in range(6) for s in STREAMS}
    sens = {(i, s): float(i) for i in range(6) for s in STREAMS}  # layer 0 least sensitive, layer 5 most
    moved = reallocate(rungs, sens, ladders)
    for s in STREAMS:
        assert moved[(0, s)] == 1 and moved[(1, s)] == 1 and moved[(5, s)] == 3
        assert all(moved[(i, s)] == 2 for i in (2, 3, 4))


# On this random model the levels' deltas are noise within +-0.1% of zero, not ordered by bits; a target just below
# zero splits the bisection's path (some levels pass, some fail), which is all these mechanics tests need.
TARGET = -0.0002


@pytest.fixture(scope="module")
def searched():
    """A search on a 2-layer random Llama with head_dim 64 (the ladders of a 16-dim head are too coarse to order by
    bytes) over probe windows longer than a perplexity chunk, so tokens do attend to a compressed past."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, vocab_size=VOCAB, hidden_size=128, intermediate_size=128,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    bases = tiny_bases(model)
    gen = torch.Generator().manual_seed(9)
    windows = [torch.randint(3, VOCAB, (1, 320), generator=gen) for _ in range(2)]
    logs: list[str] = []
    result = search(model, bases, {"random": windows}, target_delta=TARGET, sink=2, windows=(0,), flush_block=4,
                    log=logs.append)
    return model, bases, windows, result, logs


def test_search_chooses_the_most_compressed_trial_within_target(searched):
    model, _, _, result, logs = searched
    passing = [t for t in result.trials if t.measured_delta_pct <= 100 * TARGET]
    failing = [t for t in result.trials if t.measured_delta_pct > 100 * TARGET]
    assert passing and failing, "the target must split the ladder for this test to mean anything"
    assert result.chosen in passing and result.chosen.ratio == max(t.ratio for t in passing)
    assert result.codec == result.chosen.codec
    assert any(line.startswith("chose ") for line in logs)
    result.codec.check(ModelShape.from_config(model.config))


def test_chosen_codec_re_measures_within_target(searched):
    """A fresh cache from the returned codec, measured again on the same probe windows against DynamicCache."""
    model, bases, windows, result, _ = searched
    shape = ModelShape.from_config(model.config)
    caches: list[CompressedCache] = []

    def make() -> CompressedCache:
        caches.append(CompressedCache(model.config, result.codec, bases.rotated_for(result.codec, shape)))
        return caches[-1]

    base = perplexity(model, windows, lambda: DynamicCache(config=model.config)).ppl
    delta_pct = 100 * (perplexity(model, windows, make).ppl / base - 1)
    assert delta_pct <= 100 * TARGET
    assert delta_pct == pytest.approx(result.chosen.measured_delta_pct, abs=1e-6)
    assert caches[-1].compression_ratio() == pytest.approx(result.chosen.ratio)


def test_sensitivity_is_the_worst_over_domains(searched):
    """A layer counts as insensitive only where it is on every domain: per layer and stream, the larger of the two
    domains' NLL increases, each measured alone; and somewhere the second domain's is the larger (else this test
    could not tell the worst from the first domain's, which the tuner used before)."""
    model, bases, windows, _, _ = searched
    alone = [sensitivities(model, w[:, :256], bases, 2) for w in windows]
    worst = domain_sensitivities(model, {"a": windows[0], "b": windows[1]}, bases, 2, tokens=256)
    assert worst.keys() == alone[0].keys()
    for key, value in worst.items():
        assert value == max(alone[0][key], alone[1][key])
    assert any(alone[1][k] > alone[0][k] for k in worst)


def test_bytes_fall_along_the_ladder(searched):
    """Uniform levels are ordered from fewest to most bits: a lower level holds fewer bytes (a higher ratio)."""
    _, _, _, result, _ = searched
    uniform = sorted((int(t.name.rsplit(" ", 1)[1]), t.ratio) for t in result.trials if t.name.startswith("uniform"))
    assert len(uniform) >= 3
    ratios = [ratio for _, ratio in uniform]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)


# --- where `kvhub tune` writes ---------------------------------------------------------------------------------

def _tree(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_tune_refuses_to_replace_a_validated_preset_before_any_work(tmp_path, capsys, monkeypatch):
    """`--out` naming a folder that holds the bundled (validated) preset: one line naming it, nothing written, and
    the model never loaded (the refusal comes first, not after a 16-minute run)."""
    import shutil

    import kvhub.models
    from kvhub.cli import main
    from tests.paths import CALIBRATION, PRESETS

    folder = tmp_path / "HuggingFaceTB--SmolLM2-135M-Instruct"
    shutil.copytree(PRESETS / folder.name, folder)
    before = _tree(folder)
    monkeypatch.setattr(kvhub.models, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    code = main(["tune", "--model", "smollm2", "--calib", str(CALIBRATION), "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    from kvhub.registry import packaged_index

    m = packaged_index().find("smollm2").metrics
    claim = f"{m.compression_total:.2f}x at {m.ppl_delta_pct_worst:+.2f}% on its worst domain"
    assert f"the preset the registry validated ({claim})" in line and "--overwrite" in line and "--out" in line
    assert _tree(folder) == before


def test_tune_writes_beside_an_existing_preset_by_default_and_replaces_it_only_when_told(
        tmp_path, capsys, tiny_preset, model_dir, eval_text):  # noqa: F811
    """Without --out, a recipe's folder that already holds a preset keeps it: the new preset goes to a new folder,
    <folder>.tuned-1; an explicit --out holding a preset is refused; --overwrite replaces it."""
    import shutil

    from kvhub.cli import main
    from kvhub.preset import CONFIG_NAME
    from kvhub.recipe import Recipe
    from tests.test_contributing import TINY_TUNE

    folder = tmp_path / "presets" / "test--tiny-llama"
    shutil.copytree(tiny_preset, folder)
    Recipe(model="test/tiny-llama", target_ppl_delta=0.05).save(folder / "recipe.json")
    before = _tree(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text(eval_text.read_text() * 8, encoding="utf-8")
    args = ["tune", "--recipe", str(folder / "recipe.json"), "--model", str(model_dir), "--calib", str(calib), *TINY_TUNE]

    assert main(args) == 0
    out = capsys.readouterr().out
    new = folder.with_name("test--tiny-llama.tuned-1")
    assert f"{folder} already holds a preset, which stays; writing to {new}" in out and f"wrote {new}" in out
    assert _tree(folder) == before and (new / CONFIG_NAME).is_file()

    assert main([*args, "--out", str(new)]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line == f"error: {new} already holds a preset; fix: pass --out NEW_FOLDER, or --overwrite to replace it"

    assert main([*args, "--overwrite"]) == 0
    assert f"wrote {folder}\n" in capsys.readouterr().out
    after = _tree(folder)
    assert after["recipe.json"] == before["recipe.json"] and after[CONFIG_NAME] != before[CONFIG_NAME]


def test_target_binds_the_worst_domain_not_the_mean(searched, monkeypatch):
    """Two domains whose losses differ threefold at every level (loss = scale / bits): a trial can pass on the mean
    while the harder domain fails. The tuner must reject such trials and choose the most compressed one that passes
    both. ``scale`` puts the hard domain's pass mark at level 9 of the ladder."""
    import math

    import kvhub.tuning
    from kvhub.eval.ppl import PerplexityResult

    model, bases, windows, _, _ = searched
    easy, hard = windows[:1], windows[1:]
    ladders, layers = stream_ladders(64), model.config.num_hidden_layers
    k, v = LEVELS[9]
    scale = 0.999 * (ladders["keys"][k].bits_per_token() + ladders["values"][v].bits_per_token()) * layers / 3

    def fake_perplexity(model, ws, make, chunk=128):
        cache = make()
        loss = 0.0  # percent; the baseline loses nothing
        if isinstance(cache, CompressedCache):
            loss = (3 if ws is hard else 1) * scale / sum(
                layer.keys.bits_per_token() + layer.values.bits_per_token() for layer in cache.codec.layers)
        return PerplexityResult(100 * len(ws) * math.log(1 + loss / 100), 100 * len(ws))

    monkeypatch.setattr(kvhub.tuning, "perplexity", fake_perplexity)
    result = search(model, bases, {"easy": easy, "hard": hard}, target_delta=0.01, sink=2, windows=(0,), flush_block=4,
                    log=lambda _: None)
    # the fake never fills a cache, so compare trials by their bits per token (fewer bits: more compression)
    bits = lambda t: t.key_bits + t.value_bits  # noqa: E731
    mean = lambda t: sum(t.by_domain.values()) / 2  # noqa: E731
    mean_only = [t for t in result.trials if mean(t) <= 1.0 < t.by_domain["hard"]]
    assert mean_only, "the fixture must hold a trial that passes on the mean and fails on one domain"
    assert result.chosen.by_domain["hard"] <= 1.0 and result.chosen.worst_domain == "hard"
    assert any(bits(t) < bits(result.chosen) for t in mean_only)  # the mean would have chosen one of these
    assert bits(result.chosen) == min(bits(t) for t in result.trials if max(t.by_domain.values()) <= 1.0)


def test_a_pass_that_other_seeds_do_not_repeat_is_not_chosen(searched, monkeypatch):
    """Trials whose first measurement (seed 0) passes by luck: every other seed of the segments' rotation loses
    ``BUMP`` points more. Confirmation must measure the passing trials again, most compressed first, reject those
    whose mean over seeds misses, and choose the first whose mean holds, not the most compressed first pass."""
    import kvhub.tuning

    model, bases, windows, _, _ = searched
    layers = model.config.num_hidden_layers
    ladders = stream_ladders(64)
    k, v = LEVELS[9]
    bits9 = (ladders["keys"][k].bits_per_token() + ladders["values"][v].bits_per_token()) * layers
    bump = 0.3  # points at seeds other than 0: over three seeds the mean rises by 0.2

    def fake_measure(model, name, codec, bases, windows, baseline_ppl, seed=0):
        bits = sum(layer.keys.bits_per_token() + layer.values.bits_per_token() for layer in codec.layers)
        loss = 0.999 * bits9 / bits + (bump if seed else 0.0)  # seed 0 passes 1% from level 9 up
        return Trial(name, codec.layers[0].window, bits, 0.0, {"d": loss}, 1000 / bits, codec, seed)

    monkeypatch.setattr(kvhub.tuning, "measure_trial", fake_measure)
    lines: list[str] = []
    result = search(model, bases, {"d": windows[:1]}, target_delta=0.01, sink=2, windows=(0,), flush_block=4,
                    log=lines.append, confirm_seeds=(1, 2))
    first = [t for t in result.trials if " seed" not in t.name and ", mean of" not in t.name]
    # the last line counts each setting once, its runs at other seeds and their means apart
    passed = sum(t.measured_delta_pct <= 1.0 for t in first)
    assert f"; {passed} of {len(first)} settings within" in lines[-1], lines[-1]
    assert f"({len(result.trials) - len(first)} runs at other seeds and means)" in lines[-1], lines[-1]
    lucky = max((t for t in first if t.measured_delta_pct <= 1.0), key=lambda t: t.ratio)
    assert result.chosen.name.endswith(", mean of 3 seeds") and result.chosen.measured_delta_pct <= 1.0
    assert result.chosen.ratio < lucky.ratio  # the most compressed first pass did not hold over seeds
    means = [t for t in result.trials if t.name.endswith(", mean of 3 seeds")]
    assert any(t.name == f"{lucky.name}, mean of 3 seeds" and t.bound_pct > 1.0 for t in means)
    # every first pass more compressed than the choice was measured again and missed on average
    for t in first:
        if t.measured_delta_pct <= 1.0 and t.ratio > result.chosen.ratio:
            assert any(m.name == f"{t.name}, mean of 3 seeds" and m.bound_pct > 1.0 for m in means)
    summary = tuning_summary(result)
    assert "confirmed as a mean over rotation seeds 0 and 1, 2 within target with one standard error" in summary["method"]


def test_fresh_windows_confirm_each_seed_on_its_own_text_and_catch_a_search_window_easier_than_its_domain(
        searched, monkeypatch):
    """``confirm_windows="fresh"``: the search measures the domain's first window only, and confirming seeds 1 and 2
    are measured on its second and third. Here the search's window loses ``harder`` points less than the domain's
    other text at any seed: confirming on the same window holds level 9, confirming on fresh windows does not (mean
    +harder * 2/3, error harder / 3), so a less compressed setting is chosen."""
    import kvhub.tuning

    model, bases, _, _, _ = searched
    gen = torch.Generator().manual_seed(4)
    text = [torch.randint(3, VOCAB, (1, 96), generator=gen) for _ in range(3)]
    layers = model.config.num_hidden_layers
    ladders = stream_ladders(64)
    k, v = LEVELS[9]
    bits9 = (ladders["keys"][k].bits_per_token() + ladders["values"][v].bits_per_token()) * layers
    harder = 0.5
    calls: list[tuple[int, list[int]]] = []  # (seed, which of ``text`` it was measured on)

    def fake_measure(model, name, codec, bases, windows, baseline_ppl, seed=0):
        which = [next(i for i, t in enumerate(text) if t is w) for w in windows["d"]]
        calls.append((seed, which))
        bits = sum(layer.keys.bits_per_token() + layer.values.bits_per_token() for layer in codec.layers)
        loss = 0.999 * bits9 / bits + (harder if which != [0] else 0.0)  # level 9 and up pass on the first window
        return Trial(name, codec.layers[0].window, bits, 0.0, {"d": loss}, 1000 / bits, codec, seed)

    monkeypatch.setattr(kvhub.tuning, "measure_trial", fake_measure)
    kwargs = dict(target_delta=0.01, sink=2, windows=(0,), flush_block=4, log=lambda _: None, confirm_seeds=(1, 2))
    same = search(model, bases, {"d": text[:1]}, **kwargs)
    calls.clear()
    fresh = search(model, bases, {"d": text}, confirm_windows="fresh", **kwargs)
    assert all(which == [0] for seed, which in calls if seed == 0)  # the search: the first window alone
    confirming = [(seed, which) for seed, which in calls if seed]
    assert confirming and all(which == [seed] for seed, which in confirming)  # seed i on the i-th further window
    level9 = next(t for t in fresh.trials if t.name == "uniform level 9, mean of 3 seeds and windows")
    assert level9.by_domain["d"] == pytest.approx(0.999 + 2 * harder / 3, abs=1e-3)
    assert level9.se["d"] == pytest.approx(harder / 3, abs=1e-3)  # sd of (0, h, h) is h / sqrt(3); / sqrt(3)
    assert same.chosen.name == "uniform level 9, mean of 3 seeds" and same.chosen.bound_pct <= 1.0
    assert fresh.chosen.ratio < same.chosen.ratio and fresh.chosen.bound_pct <= 1.0
    assert "each further seed on a fresh held-out window" in tuning_summary(fresh)["method"]
    assert "fresh" not in tuning_summary(same)["method"]


class _CharTokenizer:
    """One token per character: windows of held-out text are then spans of characters."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


@pytest.mark.parametrize("seeds", [1, 2, 4])
def test_fresh_windows_keep_the_search_window_and_add_disjoint_ones_nearest_the_middle_first(seeds):
    from kvhub.errors import KVHubError
    from kvhub.tuning import TuneConfig, held_out_windows

    text = "".join(chr(256 + i) for i in range(1000))  # token id - 256 is the token's position in the text
    one = held_out_windows(_CharTokenizer(), text, TuneConfig("m", [], tune_window_tokens=100), "x")
    cfg = TuneConfig("m", [], tune_window_tokens=100, confirm_seeds=seeds, confirm_windows="fresh")
    windows = held_out_windows(_CharTokenizer(), text, cfg, "x")
    assert len(one) == 1 and len(windows) == 1 + seeds
    assert torch.equal(windows[0], one[0])  # the search measures what it measured with one window
    for w in windows:  # each a contiguous span of the text
        assert w[0].tolist() == list(range(int(w[0, 0]), int(w[0, 0]) + 100))
    middle = (len(text) - 100) // 2
    # each a window's length from the last on alternate sides of the middle, so none overlaps another
    assert [int(w[0, 0]) - 256 for w in windows] == [middle + k * 100 for k in (0, -1, 1, -2, 2)][:1 + seeds]
    with pytest.raises(KVHubError, match="fewer than the .* --confirm-windows fresh needs.*fix:"):
        held_out_windows(_CharTokenizer(), text[:250], cfg, "x")


def test_tune_with_fresh_windows_refuses_a_calibration_file_too_short_for_them_in_one_line(tmp_path, capsys):
    """`kvhub tune --confirm-windows fresh` on a calibration file whose held-out text holds one tuning window, not
    three: exit 1, one line naming the file and both fixes, no traceback, nothing written."""
    from kvhub.cli import main
    from tests.paths import CALIBRATION

    short = tmp_path / "calib" / "short_novel.txt"
    short.parent.mkdir()
    short.write_text((CALIBRATION / "austen_mansfield_park.txt").read_text(encoding="utf-8")[:12000])
    out = tmp_path / "out"
    code = main(["tune", "--model", "smollm2", "--calib", str(short.parent), "--out", str(out), "--confirm-windows",
                 "fresh", "--tune-window-tokens", "256", "--no-needle"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "'short_novel'" in line and "--confirm-windows same" in line and "more text" in line, line
    assert not out.exists()


def search_where_layer_1s_keys_weigh_most(searched, monkeypatch, scale: float, offset: dict[int, float] | None = None,
                                          **kwargs):
    """``search`` on one domain with a fake measurement whose loss weighs layer 1's keys 97 times as much as layer
    0's (``scale`` times a sum over (layer, stream) of weight x (level 9's bits / its bits) ** 8, plus ``offset`` at
    each rotation seed), and a fake sensitivity that ranks layer 1's keys first."""
    import kvhub.tuning

    model, bases, windows, _, _ = searched
    ladders = stream_ladders(64)
    k9, v9 = LEVELS[9]
    ref = {"keys": ladders["keys"][k9].bits_per_token(), "values": ladders["values"][v9].bits_per_token()}
    weight = {(1, "keys"): 0.97, (0, "keys"): 0.01, (0, "values"): 0.01, (1, "values"): 0.01}

    def fake_measure(model, name, codec, bases, windows, baseline_ppl, seed=0):
        bits = {(i, s): layer.stream(s).bits_per_token() for i, layer in enumerate(codec.layers) for s in STREAMS}
        loss = scale * sum(w * (ref[s] / bits[(i, s)]) ** 8 for (i, s), w in weight.items()) + (offset or {}).get(seed, 0)
        total = sum(bits.values())
        return Trial(name, codec.layers[0].window, total, 0.0, {"d": loss}, 1000 / total, codec, seed)

    monkeypatch.setattr(kvhub.tuning, "measure_trial", fake_measure)
    monkeypatch.setattr(kvhub.tuning, "domain_sensitivities", lambda *a, **k: {
        (1, "keys"): 0.9, (0, "keys"): 0.1, (0, "values"): 0.05, (1, "values"): 0.05})
    return search(model, bases, {"d": windows[:1]}, target_delta=0.01, sink=2, windows=(0,), flush_block=4,
                  log=lambda _: None, **kwargs)


def test_a_mean_within_target_by_less_than_its_standard_error_gives_way_to_the_steps_above_it(searched, monkeypatch):
    """Level 9 passes at seed 0 and on the mean of three seeds, but that mean is within target by less than its
    standard error over the seeds: it is not chosen. The steps between level 9 and 10 are measured next, and the one
    with the most sensitive layer's keys (by the tuner's sensitivity, here layer 1's) on level 10's rung holds:
    chosen over uniform level 10, which also holds with more bytes. A step that moved the least sensitive layer
    instead would miss."""
    ladders = stream_ladders(64)
    k9, v9 = LEVELS[9]
    k10 = LEVELS[10][0]
    assert LEVELS[10][1] == v9  # between the two levels only the keys move
    # offsets: mean -0.033, standard error 0.267 points
    result = search_where_layer_1s_keys_weigh_most(searched, monkeypatch, 0.999, {0: -0.3, 1: -0.3, 2: +0.5},
                                                   confirm_seeds=(1, 2))
    by_name = {t.name: t for t in result.trials}
    level9 = by_name["uniform level 9, mean of 3 seeds"]
    assert level9.measured_delta_pct <= 1.0 < level9.bound_pct  # the mean passes, the mean plus its error does not
    assert level9.se["d"] == pytest.approx(0.8 / 3, abs=1e-3)  # sd of (-0.3, -0.3, 0.5) is 0.462; / sqrt(3)
    assert result.chosen.name == "level 9, 1 most sensitive at level 10, mean of 3 seeds"
    assert result.chosen.codec.layers[1].keys == ladders["keys"][k10]
    assert result.chosen.codec.layers[0].keys == ladders["keys"][k9]
    assert by_name["uniform level 10"].measured_delta_pct <= 1.0
    assert by_name["uniform level 9"].ratio > result.chosen.ratio > by_name["uniform level 10"].ratio
    recorded = {t["name"]: t for t in tuning_summary(result)["trials"]}  # the preset records each mean's error
    assert recorded[level9.name]["se_by_domain"] == {"d": pytest.approx(0.8 / 3, abs=1e-3)}


def test_secondary_sinks_reach_every_trial_and_their_bytes_its_ratio(searched, monkeypatch):
    """``search(secondary_sinks=f)``: every codec tried keeps them at ``f``; a trial's ratio counts their rows (a
    codec with them holds the codes of the one without, plus their rows, read off the cache here)."""
    import kvhub.tuning
    from kvhub.tuning import codec_from_rungs, measure_trial, uniform_rungs

    model, bases, windows, _, _ = searched
    layers = model.config.num_hidden_layers
    plain = codec_from_rungs(stream_ladders(64), uniform_rungs(0, layers), layers, 2, 0, 4)
    # (a random model's value lengths cluster near their median: a high threshold, so that some are kept)
    kept = codec_from_rungs(stream_ladders(64), uniform_rungs(0, layers), layers, 2, 0, 4, secondary_sinks=0.95)
    base = {"random": perplexity(model, windows, lambda: DynamicCache(config=model.config)).ppl}
    made: list[CompressedCache] = []
    real_cache = kvhub.tuning.CompressedCache

    def recorded(*args, **kwargs):
        made.append(real_cache(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(kvhub.tuning, "CompressedCache", recorded)
    with_rows = measure_trial(model, "kept", kept, bases, {"random": windows}, base)
    rows = made[-1].nbytes()["secondary_sinks"]
    without = measure_trial(model, "plain", plain, bases, {"random": windows}, base)
    held = made[-1].nbytes()["total"]
    assert rows > 0
    assert with_rows.ratio == pytest.approx(without.ratio * held / (held + rows))

    tried: list[float] = []

    def fake_measure(model, name, codec, *args, **kwargs):
        tried.append(codec.secondary_sinks)
        raise StopIteration

    monkeypatch.setattr(kvhub.tuning, "measure_trial", fake_measure)
    with pytest.raises(StopIteration):
        search(model, bases, {"random": windows}, target_delta=TARGET, sink=2, windows=(0,), flush_block=4,
               log=lambda _: None, secondary_sinks=0.95)
    assert tried == [0.95]


def test_the_steps_below_the_level_the_bisection_finds_are_measured_and_the_most_compressed_that_passes_chosen(
        searched, monkeypatch):
    """The bisection finds level 9 (level 8 misses); between them, the step with the most sensitive layer's keys on
    level 9's rung passes with fewer bits than level 9, and must be chosen. Moving the least sensitive layer's keys
    instead would miss."""
    ladders = stream_ladders(64)
    k8, k9, v9 = LEVELS[8][0], *LEVELS[9]
    assert LEVELS[8][1] == v9  # between the two levels only the keys move
    result = search_where_layer_1s_keys_weigh_most(searched, monkeypatch, 0.5)
    by_name = {t.name: t for t in result.trials}
    assert by_name["uniform level 8"].measured_delta_pct > 1.0 >= by_name["uniform level 9"].measured_delta_pct
    assert result.chosen.name == "level 8, 1 most sensitive at level 9"
    assert result.chosen.codec.layers[1].keys == ladders["keys"][k9]
    assert result.chosen.codec.layers[0].keys == ladders["keys"][k8]
    assert result.chosen.ratio > by_name["uniform level 9"].ratio
