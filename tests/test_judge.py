"""The LLM judge: pure verdict logic, then the task against a fault-injecting OpenAI-compatible
server on 127.0.0.1 (retries, invalid verdicts, cache and resume, preflight, the key never written),
then against `evalkit serve` on tiny random models (other weights behind one URL, seeded verdicts)."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from helpers import suite_of, write_jsonl, write_suite
from judge_fault_server import FaultServer

from evalkit.backends.hf import HFBackend
from evalkit.cache import Cache
from evalkit.config.task import JudgeTask, Task
from evalkit.console_summary import _judge_noise
from evalkit.context import RunContext, RunVariant
from evalkit.errors import ConfigError, ExitCode
from evalkit.judge import verdicts as V
from evalkit.judge.client import SEED_POLICY, JudgeClient
from evalkit.models.base import ResolvedBase
from evalkit.shape import parse
from evalkit.tasks import judge
from evalkit.types import Output, Score

KEY = "sk-evalkit-test-7f3a9c1e5b2d"
KEY_ENV = "EVALKIT_TEST_JUDGE_KEY"


# ---------------------------------------------------------------- pure verdict logic

def test_majority_mean_and_conservative_ties():
    assert V.majority([3, 5, 5]) == 5
    assert V.majority([1.0, 0.0]) == 0.0  # pass/fail tie -> fail
    assert V.majority([5, 3, 3, 5]) == 3
    assert V.mean([1, 2, 4, 5]) == 3
    assert V.aggregate([1, 1, 5], "mean") == pytest.approx(7 / 3)


def test_flip_rate_and_position_bias_rate():
    assert V.flipped([4, 4, 4]) is False and V.flipped([4, 5]) is True
    assert V.rate([True, False, False, False]) == 0.25 and V.rate([]) is None
    assert V.pairwise_value("A", candidate_first=True) == 1 and V.pairwise_value("A", candidate_first=False) == 0
    assert V.pairwise_value("tie", candidate_first=True) == 0.5
    assert V.combine_orders(1.0, 1.0, "majority") == (1.0, False)
    assert V.combine_orders(1.0, 0.0, "majority") == (0.5, True)  # always "A": bias cancelled to a tie
    assert V.combine_orders(1.0, 0.5, "mean") == (0.75, True)


def test_cohens_kappa_matches_hand_computation():
    # 10 items: judge vs human, yes/no. Agreement p_o = 7/10.
    # judge yes 6 / no 4, human yes 5 / no 5: p_e = (6*5 + 4*5) / 100 = 0.5; kappa = (0.7-0.5)/0.5 = 0.4
    judge_ = ["y", "y", "y", "y", "y", "y", "n", "n", "n", "n"]
    human = ["y", "y", "y", "y", "n", "n", "y", "n", "n", "n"]
    assert V.accuracy(judge_, human) == pytest.approx(0.7)
    assert V.cohens_kappa(judge_, human) == pytest.approx(0.4)
    assert V.cohens_kappa(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert V.cohens_kappa(["y", "y"], ["y", "y"]) is None  # p_e = 1: undefined
    assert V.cohens_kappa([], []) is None


def test_parse_verdict_accepts_json_in_fences_or_prose_and_rejects_the_rest():
    schema = V.rubric_schema((1, 5))
    assert V.parse_verdict('{"score": 4, "reason": "ok"}', schema)["score"] == 4
    assert V.parse_verdict('```json\n{"score": 2, "reason": "x"}\n```', schema)["score"] == 2
    assert V.parse_verdict('Verdict: {"score": "5", "reason": "x"} done', schema)["score"] == 5.0
    assert V.parse_verdict('{"winner": "Tie", "reason": "same"}', V.PAIRWISE_SCHEMA)["winner"] == "tie"
    for bad, why in [("a 4, I think", "no JSON object"), ('{"score": 9, "reason": "x"}', "maximum"),
                     ('{"score": 3}', "'reason' is a required"), ("[1, 2]", "JSON object")]:
        with pytest.raises(V.VerdictError, match=why):
            V.parse_verdict(bad, schema)
    with pytest.raises(V.VerdictError):
        V.parse_verdict('{"verdict": "maybe", "reason": "x"}', V.rubric_schema(V.PASS_FAIL))


def _v(data=None, error="bad"):
    return V.Verdict(data, error="" if data else error)


def test_score_rubric_and_pairwise_from_verdicts():
    s = V.score_rubric([_v({"score": 4, "reason": "a"}), _v({"score": 2, "reason": "b"}),
                        _v({"score": 4, "reason": "c"})], (1, 5), "majority")
    assert s.value == 0.75 and s.meta["raw"] == 4 and s.meta["flip"] and s.reason == "a"
    bad = V.score_rubric([_v(), _v(error="unparseable")], (1, 5), "majority")
    assert bad.value is None and bad.reason.startswith("invalid: ") and not bad.valid
    pf = V.score_rubric([_v({"verdict": "pass", "reason": "x"}), _v({"verdict": "fail", "reason": "y"})],
                        V.PASS_FAIL, "majority")
    assert pf.value == 0.0  # a tie is not a pass
    win = V.score_pairwise([_v({"winner": "A", "reason": "r"})], [_v({"winner": "B", "reason": "r"})], "majority")
    assert win.value == 1.0 and win.meta["order_disagree"] is False
    biased = V.score_pairwise([_v({"winner": "A", "reason": "r"})], [_v({"winner": "A", "reason": "r"})], "majority")
    assert biased.value == 0.5 and biased.meta["order_disagree"] is True
    half = V.score_pairwise([_v({"winner": "A", "reason": "r"})], [_v()], "majority")
    assert half.value is None  # one ordering alone cannot cancel position bias


def test_labels_for_agreement():
    assert V.human_label("A", "pairwise", None) == "win" and V.human_label("tie", "pairwise", None) == "tie"
    assert V.human_label("pass", "rubric", V.PASS_FAIL) == 1 and V.human_label(False, "rubric", V.PASS_FAIL) == 0
    assert V.human_label(4, "rubric", (1, 5)) == 4
    with pytest.raises(ValueError):
        V.human_label(7, "rubric", (1, 5))
    assert V.judge_label(Score(None), "rubric", (1, 5)) == "invalid"
    assert V.judge_label(Score(0.5, meta={"raw": 3.4}), "rubric", (1, 5)) == 3


# ---------------------------------------------------------------- the task against a faulty endpoint

OUTPUTS = {"base": ["BAD answer", "meh", "GOOD answer", "GARBAGE"],
           "lora": ["GOOD answer", "GOOD answer", "meh", "NOISY"]}


class StubContext(RunContext):
    """A RunContext whose variants' outputs are canned (as if cached): the judge is under test here."""

    def generate(self, lv, cases, gen, *, desc=""):
        return [(Output(text=OUTPUTS[lv.name][i], prompt=f"<prompt {c.id}>"), True) for i, c in enumerate(cases)]


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "rubric.md").write_text("# Helpful\n- Correct\n- Concise\n")
    write_jsonl(tmp_path / "data.jsonl", [{"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i}"}]}
                                          for i in range(4)])
    return tmp_path


def make_task(url: str, workdir: Path, **params) -> JudgeTask:
    cfg = {"base_url": url, "model": "judge", "api_key_env": KEY_ENV, "timeout": 0.5, "backoff": 0.01,
           "concurrency": 3, **params.pop("judge", {})}
    return parse(JudgeTask, {"name": "helpful", "kind": "judge", "data": "data.jsonl", "judge": cfg,
                             "rubric": "rubric.md", **params}, base_dir=workdir)


def at_index(task: JudgeTask, i: int) -> JudgeTask:
    task._index = i
    return task


def make_ctx(task: Task, workdir: Path, logs: list[str] | None = None, cache: str = "cache.sqlite") -> StubContext:
    suite = suite_of(workdir / "suite.yml", tasks=(task,))
    backend = HFBackend.over(None, None, {v.name: None if v.is_base else v.name for v in suite.variants})
    lvs = [RunVariant(v, None, v.name, backend) for v in suite.variants]
    log = (logs.append if logs is not None else (lambda _: None))
    return StubContext(suite=suite, base=ResolvedBase(suite.base, "x", "0"), tokenizer=None, variants=lvs,
                       cache=Cache(workdir / cache), log=log, progress=False)


def by_case(result, variant):
    return {s.case_id: s.scores for s in result.samples if s.variant == variant}


def test_judge_survives_faults_records_invalid_and_rerun_asks_only_the_invalid_item(workdir, key_env):
    with FaultServer(key=KEY, faults=["429", "500", "slow", "drop", "garbage"], slow_s=1.0) as srv:
        task = make_task(srv.url, workdir, samples=2)
        judge.preflight(task)  # as the runner does
        result = judge.run(make_ctx(task, workdir), task)
        j = result.extras["judge"]
        # every fault it could survive was survived: 4 transport retries, 1 re-ask after garbage
        assert j["retries"] == 4 and j["errors"] == 0
        assert srv.counts["chat"] + 1 == j["requests"] == j["calls"] + 4 + 1  # + the run's GET /models
        assert srv.counts["models"] == 2  # the preflight's and the run's
        # 2 variants x 4 cases x 2 samples = 16 verdicts; the GARBAGE item is asked 3 times per sample
        assert j["calls"] in (16 + 4 + 1, 16 + 4)  # +1 unless the scripted garbage hit that same item
        base, lora = by_case(result, "base"), by_case(result, "lora")
        assert [base[c]["rubric"].value for c in ("c0", "c1", "c2")] == [0.0, 0.5, 1.0]
        assert base["c3"]["rubric"].value is None and "unparseable verdict after 3 tries" in base["c3"]["rubric"].reason
        assert j["invalid"] == 1 and j["invalid_verdicts"] == 2
        assert lora["c3"]["rubric"].meta["flip"] is True  # the NOISY item
        assert j["flip_rate"] == {"base": 0.0, "lora": 0.25}
        assert result.binary == {"rubric": False}
        assert not any(s.cached for s in result.samples)  # judge calls were made for each
        assert j["model"] == "judge" and j["position_bias_rate"] == {}
        assert "flip rate over 2 samples: base 0.0%, lora 25.0%" in _judge_noise(j)  # the console line

        before = srv.counts["chat"]
        judge.preflight(task)
        again = judge.run(make_ctx(task, workdir), task)
        # the invalid item alone is asked again (2 samples x 3 tries); every valid verdict is reused
        assert again.extras["judge"]["calls"] == 6 == srv.counts["chat"] - before
        assert again.extras["judge"]["cached"] == j["calls"] - 6
        assert all("GARBAGE" in b["messages"][1]["content"] for b in srv.bodies[before:])
        assert [s.scores for s in again.samples] == [s.scores for s in result.samples]
        assert [(s.variant, s.case_id) for s in again.samples if not s.cached] == [("base", "c3")]


def test_rerun_after_a_judge_fault_asks_exactly_the_invalid_items_again(workdir, key_env):
    with FaultServer(key=KEY, faults=["garbage", "garbage"]) as srv:
        task = make_task(srv.url, workdir, judge={"concurrency": 1, "invalid_retries": 0})
        first = judge.run(make_ctx(task, workdir), task)
        invalid = [(s.variant, s.case_id) for s in first.samples if not s.scores["rubric"].valid]
        # one request per item, in order (concurrency 1): the two faults hit base c0 and c1
        assert invalid == [("base", "c0"), ("base", "c1"), ("base", "c3")] and srv.counts["chat"] == 8
        first_bodies = list(srv.bodies)

        second = judge.run(make_ctx(task, workdir), task)
        assert srv.counts["chat"] == 8 + 3 and second.extras["judge"]["cached"] == 5
        # the very same requests (messages and seed), and nothing else
        assert srv.bodies[8:] == [first_bodies[i] for i in (0, 1, 3)]
        assert [(s.variant, s.case_id) for s in second.samples if not s.scores["rubric"].valid] == [("base", "c3")]

        judge.run(make_ctx(task, workdir), task)
        assert srv.counts["chat"] == 8 + 3 + 1  # now only the item the judge can never grade


def test_seeds_are_derived_per_request_and_an_endpoint_ignoring_them_is_said(workdir, key_env):
    with FaultServer(key=KEY) as srv:
        task = make_task(srv.url, workdir, samples=2, judge={"temperature": 0.7})
        result = judge.run(make_ctx(task, workdir), task)
        j = result.extras["judge"]
        assert j["seeds"] == {"policy": SEED_POLICY, "probe": "ignored", "honoured": False}
        assert j["probe_calls"] == 3 and srv.counts["chat"] == j["calls"] + 3
        assert j["endpoint"] == {"base_url": srv.url, "id": "judge", "owned_by": "test"}
        assert j["endpoint_verified"] is False
        noise = _judge_noise(j)
        assert "lists no content fingerprint for 'judge': weights unverified" in noise
        assert "the endpoint ignores seeds: verdicts at temperature 0.7 are not reproducible" in noise

        def seeds(bodies):
            return sorted((json.dumps(b["messages"]), b["seed"]) for b in bodies if "# Rubric" in str(b["messages"]))

        first = seeds(srv.bodies)
        assert len(first) == j["calls"] and len({s for _, s in first}) == len(first)  # one seed per request
        assert all(isinstance(s, int) and 0 <= s < 2**31 for _, s in first)
        n = len(srv.bodies)
        judge.run(make_ctx(task, workdir), task)  # the probe's answer is cached with the verdicts
        assert not any("# Rubric" not in str(b["messages"]) for b in srv.bodies[n:])
        srv.bodies.clear()
        judge.run(make_ctx(task, workdir, cache="fresh.sqlite"), task)
        assert seeds(srv.bodies) == first  # another machine, another cache: the same seeds

def test_pairwise_reports_position_bias_and_outcomes(workdir, key_env):
    with FaultServer(key=KEY) as srv:
        task = make_task(srv.url, workdir, mode="pairwise")
        result = judge.run(make_ctx(task, workdir), task)
    lora = {c: s["pairwise"] for c, s in by_case(result, "lora").items()}
    assert set(by_case(result, "base")) == set()  # the reference is not scored against itself
    # c0, c1: GOOD vs not -> win both ways; c2: loses both ways; c3: neither GOOD -> the fake judge
    # always says "A", so the two orders disagree -> a tie, counted as position bias
    assert [lora[c].value for c in ("c0", "c1", "c2", "c3")] == [1.0, 1.0, 0.0, 0.5]
    assert [lora[c].meta["order_disagree"] for c in ("c0", "c1", "c2", "c3")] == [False, False, False, True]
    j = result.extras["judge"]
    assert j["position_bias_rate"] == {"lora": 0.25} and j["vs"] == "base"
    assert "position bias (orders disagree): lora 25.0%" in _judge_noise(j)
    assert j["calls"] == 4 * 2 and srv.counts["chat"] == 8
    assert result.samples[0].meta["reference_output"] == "BAD answer"


def test_anchor_agreement(workdir, key_env):
    rows = [{"id": "a1", "prompt": "q", "output": "GOOD", "label": "pass"},
            {"id": "a2", "prompt": "q", "output": "BAD", "label": "fail"},
            {"id": "a3", "prompt": "q", "output": "meh", "label": "pass"},  # the judge says fail
            {"id": "a4", "prompt": "q", "output": "GARBAGE", "label": "fail"}]  # invalid: a disagreement
    write_jsonl(workdir / "anchors.jsonl", rows)
    with FaultServer(key=KEY) as srv:
        task = make_task(srv.url, workdir, scale="pass_fail", anchors="anchors.jsonl", judge={"invalid_retries": 0})
        result = judge.run(make_ctx(task, workdir), task)
    a = result.extras["judge"]["anchors"]
    assert a["n"] == 4 and a["n_invalid"] == 1 and a["accuracy"] == 0.5
    # judge [1, 0, 0, invalid] vs human [1, 0, 1, 0]: p_o = 1/2, p_e = (1*2 + 2*2) / 16 = 3/8
    assert a["kappa"] == pytest.approx((0.5 - 3 / 8) / (1 - 3 / 8))
    assert result.binary == {"rubric": True}
    assert {s.case_id: s.scores["rubric"].value for s in result.samples if s.variant == "lora"}["c0"] == 1.0


def test_persistent_errors_are_recorded_and_an_interrupted_run_resumes(workdir, key_env):
    with FaultServer(key=KEY, faults=["500"] * 3) as srv:
        task = make_task(srv.url, workdir, judge={"retries": 2, "concurrency": 1})
        first = judge.run(make_ctx(task, workdir), task)
        j = first.extras["judge"]
        assert j["errors"] == 1 and j["invalid"] == 2  # c0 (endpoint error) + the GARBAGE item
        failed = by_case(first, "base")["c0"]["rubric"]
        assert failed.value is None and failed.reason.startswith("invalid: endpoint error: HTTP 500")
        done = srv.counts["chat"]
        second = judge.run(make_ctx(task, workdir), task)
        # only the invalid items are asked again: c0 (now answered), the GARBAGE item (3 tries)
        assert second.extras["judge"]["calls"] == 1 + 3 and srv.counts["chat"] == done + 4
        assert by_case(second, "base")["c0"]["rubric"].value == 0.0

    # an interrupt in the middle: what finished is cached, the rerun asks only the rest
    (workdir / "cache.sqlite").unlink()
    with FaultServer(key=KEY) as srv:
        task = make_task(srv.url, workdir, judge={"concurrency": 1})
        client = JudgeClient(task.judge, Cache(workdir / "cache.sqlite"))
        reqs = [(V.rubric_messages("r", "q", f"GOOD {i}", (1, 5)), V.rubric_schema((1, 5)), 0) for i in range(6)]
        seen = []

        def interrupt_after_two():
            seen.append(1)
            if len(seen) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            client.judge_many(reqs, on_done=interrupt_after_two)
        made = srv.counts["chat"]
        assert 2 <= made < 6
        again = JudgeClient(task.judge, Cache(workdir / "cache.sqlite"))
        assert all(v.valid for v in again.judge_many(reqs))
        assert again.stats["cached"] == made and srv.counts["chat"] == 6


# ---------------------------------------------------------------- preflight (exit 4, clear messages)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_failures_are_config_errors_with_clear_messages(workdir, monkeypatch):
    with FaultServer(key=KEY, models=["judge", "judge-large"]) as srv:
        monkeypatch.delenv(KEY_ENV, raising=False)
        with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV} is not set") as e:
            judge.preflight(make_task(srv.url, workdir))
        assert e.value.exit_code == ExitCode.USAGE_ERROR == 4

        monkeypatch.setenv(KEY_ENV, KEY + "-wrong")
        with pytest.raises(ConfigError, match=r"refused the API key.*HTTP 401") as e:
            judge.preflight(make_task(srv.url, workdir))
        assert KEY not in str(e.value)  # the server echoed the key back; we redact it

        monkeypatch.setenv(KEY_ENV, KEY)
        with pytest.raises(ConfigError, match=r"model 'judg' is not listed .*available: judge, judge-large"):
            judge.preflight(make_task(srv.url, workdir, judge={"model": "judg"}))
        judge.preflight(make_task(srv.url, workdir))  # all good
        assert srv.counts["chat"] == 0  # preflight never spends a completion

    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(ConfigError, match=rf"^tasks\[2\]\.judge: judge endpoint unreachable at {url}"):
        judge.preflight(at_index(make_task(url, workdir, judge={"retries": 0}), 2))
    with pytest.raises(ConfigError, match="rubric file not found"):
        judge.preflight(make_task(url, workdir, rubric="nope.md"))
    with pytest.raises(ConfigError, match="must not be written in the suite") as e:
        judge.preflight(make_task(url, workdir, judge={"api_key": KEY}))
    assert KEY not in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'sample'; did you mean 'samples'"):
        judge.preflight(make_task(url, workdir, samples=2, sample=3))


# ---------------------------------------------------------------- the key is never written

def test_api_key_appears_in_no_file_of_a_run(tmp_path, tiny_model_dir, key_env, capsys):
    """Through the real runner: a judge task on a tiny model, then grep the run folder and cache."""
    from evalkit.runner import evaluate

    (tmp_path / "rubric.md").write_text("- Correct\n")
    write_jsonl(tmp_path / "data.jsonl", [{"id": f"c{i}", "prompt": f"Say {i}"} for i in range(3)])
    logs: list[str] = []
    with FaultServer(key=KEY, faults=["500"]) as srv:
        suite = write_suite(tmp_path / "suite.yml", {
            "name": "keycheck", "base": {"path": str(tiny_model_dir)}, "variants": [{"name": "base"}],
            "tasks": [{"name": "helpful", "kind": "judge", "data": "data.jsonl", "max_new_tokens": 4,
                       "rubric": "rubric.md",
                       "judge": {"base_url": srv.url, "model": "judge", "api_key_env": KEY_ENV, "timeout": 5}}],
            "gates": [{"metric": "helpful.rubric", "variant": "base", "min": 0.0}]})
        out, cache = tmp_path / "run", tmp_path / "cache" / "results.sqlite"
        first = evaluate(suite, out=out, cache_path=cache, progress=False, log=logs.append)
        calls = srv.counts["chat"]
        again = evaluate(suite, out=tmp_path / "run2", cache_path=cache, progress=False, log=logs.append)
        assert srv.counts["chat"] == calls  # the rerun, through the runner too, makes zero judge calls
    extras = next(t for t in first.results["tasks"] if t["name"] == "helpful")["extras"]["judge"]
    assert extras["calls"] == 3 and extras["retries"] == 1 and extras["api_key_env"] == KEY_ENV
    assert again.results["tasks"][0]["extras"]["judge"]["calls"] == 0
    (out / "console.log").write_text("\n".join(logs) + capsys.readouterr().out)
    files = [p for d in (out, tmp_path / "run2", cache.parent) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "results.json" for p in files) and any(p.suffix == ".sqlite" for p in files)
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.parametrize("policy", ["loss", "drop"])
def test_a_task_whose_every_item_is_invalid_fails_the_run(tmp_path, tiny_model_dir, key_env, policy):
    """Every verdict unreadable: the metric is all-invalid. By default that fails the run (exit 1)
    instead of printing `nan` and passing; `invalid: drop` reports it without failing."""
    from evalkit.runner import evaluate

    (tmp_path / "rubric.md").write_text("- Correct\n")
    write_jsonl(tmp_path / "data.jsonl", [{"id": f"c{i}", "prompt": f"Say {i}"} for i in range(3)])
    with FaultServer(key=KEY, faults=["garbage"] * 20) as srv:
        suite = write_suite(tmp_path / "suite.yml", {
            "name": "allinvalid", "base": {"path": str(tiny_model_dir)}, "variants": [{"name": "base"}],
            "tasks": [{"name": "helpful", "kind": "judge", "data": "data.jsonl", "max_new_tokens": 4,
                       "rubric": "rubric.md", "invalid": policy,
                       "judge": {"base_url": srv.url, "model": "judge", "api_key_env": KEY_ENV, "timeout": 5,
                                 "invalid_retries": 0}}]})
        run = evaluate(suite, out=tmp_path / "run", cache_path=tmp_path / "cache.sqlite", progress=False,
                       log=lambda _: None)
    metric = next(m for m in run.results["metrics"] if m["metric"] == "rubric")
    assert metric["n"] == 0 and metric["n_invalid"] == 3
    gates = run.results["gates"]
    if policy == "loss":
        assert run.exit_code == 1 and [g["id"] for g in gates] == ["helpful.rubric.valid[base]"]
        assert not gates[0]["passed"] and "all 3 scores of helpful.rubric for 'base' are invalid" in gates[0]["message"]
    else:
        assert run.exit_code == 0 and gates == []


# ---------------------------------------------------------------- against evalkit serve: weights and seeds

@pytest.fixture(scope="module")
def other_weights_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with other weights: same config, tokenizer and (once served) name."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-other")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    save_file({k: -v for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def serve_task(url: str, workdir: Path, **judge_params) -> Task:
    """A judge task on `evalkit serve`'s base: constrained JSON, so even a random model gives valid verdicts;
    2 cases x 2 variants keep it fast."""
    task = make_task(url, workdir, judge={"model": "base", "api_key_env": None, "response_format": "json_schema",
                                          "max_tokens": 110, "timeout": 30, **judge_params})
    return task.model_copy(update={"limit": 2})


def judged(workdir: Path, task: Task, cache: str = "cache.sqlite"):
    judge.preflight(task)
    return judge.run(make_ctx(task, workdir, cache=cache), task)


def test_other_weights_behind_the_same_url_and_name_are_judged_afresh(workdir, tiny_model_dir, other_weights_dir):
    from evalkit.serve.server import make_server

    first = make_server(str(tiny_model_dir), port=0, log=lambda _: None)
    first.start()
    port, task = int(first.url.rsplit(":", 1)[1].removesuffix("/v1")), serve_task(first.url, workdir)
    try:
        one = judged(workdir, task)
        again = judged(workdir, task)
        assert first.counts["chat"] == one.extras["judge"]["calls"] == 4  # the same weights: all reused
        assert again.extras["judge"]["calls"] == 0 and again.extras["judge"]["cached"] == 4
    finally:
        first.close()
    second = make_server(str(other_weights_dir), port=port, log=lambda _: None)  # same URL, same name "base"
    second.start()
    try:
        swapped = judged(workdir, task)
    finally:
        second.close()
    j1, j2 = one.extras["judge"], swapped.extras["judge"]
    assert j2["calls"] == 4 == second.counts["chat"] and j2["cached"] == 0  # asked again, nothing replayed
    assert all(s.scores["rubric"].valid for s in one.samples + swapped.samples)
    assert j1["endpoint"]["base_url"] == j2["endpoint"]["base_url"] and j1["endpoint"]["id"] == j2["endpoint"]["id"]
    assert j1["endpoint"]["fingerprint"] == first.engine.fingerprints["base"] != j2["endpoint"]["fingerprint"]
    assert j1["endpoint_verified"] and f"weights {j1['endpoint']['fingerprint'][:12]}" in _judge_noise(j1)


def test_seeded_verdicts_at_temperature_repeat_across_fresh_caches(workdir, tiny_model_dir):
    from evalkit.serve.server import make_server

    srv = make_server(str(tiny_model_dir), port=0, log=lambda _: None)
    srv.start()
    task = serve_task(srv.url, workdir, temperature=1.0)  # concurrency 3: requests interleave
    task = task.model_copy(update={"limit": 1, "samples": 2})
    try:
        runs = [judged(workdir, task, cache) for cache in ("one.sqlite", "two.sqlite")]
    finally:
        srv.close()
    verdicts = [[(s.variant, s.case_id, s.scores) for s in r.samples] for r in runs]  # sampled reasons too
    assert verdicts[0] == verdicts[1]
    j = runs[0].extras["judge"]
    assert j["calls"] == 4 and runs[1].extras["judge"]["calls"] == 4  # nothing shared: both really asked
    # the probe saw another seed give another reply: the sampling varies, it is the seeds that repeat
    assert j["seeds"]["probe"] == "honoured" and j["seeds"]["honoured"] is True
    assert "seed" not in _judge_noise(j)  # nothing to warn about
