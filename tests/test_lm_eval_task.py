"""`kind: lm_eval`: any lm-eval task (a registry name, a task YAML, a folder of them) as a canary,
scored through evalkit's backends, per document, cached per request."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_adapter, write_jsonl, write_suite

from evalkit.errors import ExitCode
from evalkit.tasks import harness_lm, harness_results, harness_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARC_YAML = """\
task: tiny_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

MATH_YAML = """\
task: tiny_math
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light", "north", "paper", "music", "glass"]


def arc_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        texts = [WORDS[(i + k) % len(WORDS)] + (" tree" if k == 2 else "") for k in range(4)]
        rows.append({"id": f"q{i}", "question": f"Which word comes after {WORDS[i % len(WORDS)]}?",
                     "choices": {"text": texts, "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]})
    return rows


def write_task(folder: Path, name: str, template: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / f"{name}.jsonl", rows)
    path = folder / f"{name}.yaml"
    path.write_text(template.format(data=data))
    return path


def run_suite(tmp_path: Path, suite: dict, name: str = "suite.yml", **kwargs):
    from evalkit.runner import evaluate

    logs: list[str] = []
    run = evaluate(write_suite(tmp_path / name, suite), out=tmp_path / name.replace(".yml", ""),
                   cache_path=tmp_path / "cache.sqlite", progress=False, log=logs.append, **kwargs)
    return run, logs


def samples(run) -> list[dict]:
    return [json.loads(line) for line in (run.run_dir / "samples.jsonl").read_text().splitlines()]


def test_multiple_choice_yaml_matches_lm_eval_hf_per_document(tmp_path, tiny_model_dir):
    """Point 1: a local ARC-style task through `kind: lm_eval` (the runner, the hf backend, the
    request cache) gives per-document answers identical to lm_eval.simple_evaluate(model="hf")."""
    arc = write_task(tmp_path / "tasks", "tiny_arc", ARC_YAML, arc_rows())
    lora = make_adapter(tiny_model_dir, tmp_path / "lora", seed=3, scale_b=20.0)
    suite = {"name": "lm-eval-canary", "base": {"path": str(tiny_model_dir)},
             "variants": [{"name": "base"}, {"name": "lora", "adapter": str(lora)}],
             "tasks": [{"name": "arc", "kind": "lm_eval", "tasks": ["tasks/tiny_arc.yaml"], "batch_size": 5}],
             "gates": [{"metric": "arc.acc", "max_drop": 50, "vs": "base"}]}
    run, logs = run_suite(tmp_path, suite)
    assert run.exit_code == ExitCode.OK, [g["message"] for g in run.results["gates"]]

    ref = harness_results.documents(harness_lm.simple_evaluate(
        "hf", [str(arc)], model_args=f"pretrained={tiny_model_dir}", device="cpu", batch_size=4))
    ref_lora = harness_results.documents(harness_lm.simple_evaluate(
        "hf", [str(arc)], model_args=f"pretrained={tiny_model_dir},peft={lora}", device="cpu", batch_size=4))
    got = {(s["variant"], s["case_id"]): s for s in samples(run)}
    assert len(got) == 2 * 12
    for variant, docs in (("base", ref), ("lora", ref_lora)):
        for d in docs:
            s = got[(variant, d.case_id)]
            assert (s["output"], s["scores"]["acc"]["value"], s["scores"]["acc_norm"]["value"]) == \
                (d.output, d.metrics["acc"], d.metrics["acc_norm"]), (variant, d.case_id)
            assert s["meta"]["loglikelihoods"] == pytest.approx(list(d.loglikelihoods), abs=1e-4)
            assert s["prompt"] == d.prompt and s["target"] == d.target
    # the adapter really answers differently somewhere (or the equality above proves little)
    assert any(got[("base", d.case_id)]["meta"]["loglikelihoods"] != got[("lora", d.case_id)]["meta"]["loglikelihoods"]
               for d in ref)
    task = run.results["tasks"][0]
    assert task["binary"] == {"acc": True, "acc_norm": True} and task["n_cases"] == 12
    # lm-eval's own numbers recorded beside evalkit's: the same accuracy
    ours = {m["variant"]: m["value"] for m in run.results["metrics"] if m["metric"] == "acc"}
    assert task["extras"]["lm_eval"]["base"]["tiny_arc"]["acc,none"] == pytest.approx(ours["base"])
    assert task["extras"]["per_task"]["lora"]["tiny_arc"]["metrics"]["acc"] == pytest.approx(ours["lora"])
    assert task["extras"]["per_task"]["lora"]["tiny_arc"]["metric"] == "acc"  # the headline: lm-eval's first
    html = (run.run_dir / "report.html").read_text()
    assert 'id="canary"' in html and "tiny_arc" in html and "lm-eval&#39;s numbers, lora" in html

    # a rerun: every request cached, no model loaded
    again, logs = run_suite(tmp_path, suite, name="again.yml")
    assert "arc: base answers reused from cache (12 documents)" in logs
    assert again.results["environment"]["device"] == "none" and all(s["cached"] for s in samples(again))


def test_generate_until_task_runs_and_gates(tmp_path, tiny_model_dir):
    """Point 1: a GSM8K-style generate_until task (exact_match) runs through the backend and gates.
    Its targets are what the base itself answers (learned in a first run), so the base scores 100%:
    an adapter that changes nothing passes `max_drop: 0`, a damaging one fails it."""
    rows = [{"question": f"{a} plus {b}", "answer": "?"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (6, 6)]]
    folder = tmp_path / "tasks"
    write_task(folder, "tiny_math", MATH_YAML, rows)
    null = make_adapter(tiny_model_dir, tmp_path / "null", seed=4, scale_b=0.01)
    wreck = make_adapter(tiny_model_dir, tmp_path / "wreck", seed=5, scale_b=60.0)
    suite = {"name": "math", "base": {"path": str(tiny_model_dir)},
             "variants": [{"name": "base"}, {"name": "null", "adapter": str(null)},
                          {"name": "wreck", "adapter": str(wreck)}],
             "tasks": [{"name": "math", "kind": "lm_eval", "tasks": ["tasks"], "num_fewshot": 0}],  # a folder
             "gates": [{"metric": "math.exact_match", "max_drop": 0, "vs": "base"}]}
    first, _ = run_suite(tmp_path, suite, name="first.yml")
    base_said = {s["meta"]["doc_id"]: s["meta"]["filtered"]["none"] for s in samples(first) if s["variant"] == "base"}
    assert len(base_said) == 6 and all(isinstance(v, str) for v in base_said.values())
    write_jsonl(folder / "tiny_math.jsonl", [dict(r, answer=base_said[i]) for i, r in enumerate(rows)])

    run, logs = run_suite(tmp_path, suite)
    by = {(s["variant"], s["case_id"]): s for s in samples(run)}
    assert all(by[("base", f"tiny_math/{i}")]["scores"]["exact_match"]["value"] == 1.0 for i in range(6))
    assert by[("base", "tiny_math/0")]["prompt"] == "Question: 1 plus 2\nAnswer:"
    gates = {g["variant"]: g for g in run.results["gates"]}
    assert gates["null"]["passed"], gates["null"]["message"]
    assert not gates["wreck"]["passed"], gates["wreck"]["message"]
    assert run.exit_code == ExitCode.GATE_FAILED
    # generations were cached per prompt: the second run generated nothing for the base
    assert "math: base answers reused from cache (6 documents)" in logs


def test_slice_is_seeded_and_nested(tmp_path):
    """`limit` takes the first N of a seeded order of each task's documents: another seed another
    slice, a larger limit extends a smaller one (cached answers carry over)."""
    small, large = harness_tasks.seeded_indices(100, 10, 0, "t"), harness_tasks.seeded_indices(100, 30, 0, "t")
    assert set(small) < set(large) and len(small) == 10 and small == sorted(small)
    assert harness_tasks.seeded_indices(100, 10, 1, "t") != small
    assert harness_tasks.seeded_indices(5, 10, 0, "t") == [0, 1, 2, 3, 4]


def test_limit_slices_each_task_and_reports_power(tmp_path, tiny_model_dir):
    arc = write_task(tmp_path / "tasks", "tiny_arc", ARC_YAML, arc_rows())
    suite = {"name": "sliced", "base": {"path": str(tiny_model_dir)}, "variants": [{"name": "base"}],
             "tasks": [{"name": "arc", "kind": "lm_eval", "tasks": [str(arc)], "limit": 5, "seed": 3}]}
    run, logs = run_suite(tmp_path, suite)
    ids = sorted(int(s["case_id"].split("/")[1]) for s in samples(run))
    assert ids == harness_tasks.seeded_indices(12, 5, 3, "tiny_arc")
    info = run.results["tasks"][0]["extras"]["slice"]
    assert info["n"] == 5 and info["limit"] == 5 and "5 documents:" in info["power_note"]
    assert any(line.startswith("arc: 5 documents over 1 lm-eval task(s) (seed 3)") for line in logs)


def test_bad_tasks_give_located_errors(tmp_path, tiny_model_dir):
    """A missing task file is refused at load; a registry task whose data needs the hub (offline
    here) names the dataset and how to point the task at local files; sampled generation is
    refused. All exit 4 with the task's YAML path."""
    from evalkit.cli import main
    from evalkit.runner import evaluate

    base = {"name": "bad", "base": {"path": str(tiny_model_dir)}, "variants": [{"name": "base"}]}
    write_suite(tmp_path / "missing.yml", base | {"tasks": [{"name": "c", "kind": "lm_eval", "tasks": ["nope.yaml"]}]})
    assert main(["run", str(tmp_path / "missing.yml"), "--out", str(tmp_path / "o1")]) == ExitCode.USAGE_ERROR
    (tmp_path / "empty").mkdir()  # a folder with no task in it: refused by the preflight, before any training
    recipe = {"name": "never", "train": str(Path(__file__).parents[1] / "trainers" / "recipes" / "lora.yml")}
    write_suite(tmp_path / "empty.yml", base | {"variants": [{"name": "base"}, recipe],
                                                "tasks": [{"name": "c", "kind": "lm_eval", "tasks": ["empty"]}]})
    with pytest.raises(Exception, match=r"empty.yml:\d+ tasks\[0\].tasks: no lm-eval task YAML") as e:
        evaluate(tmp_path / "empty.yml", out=tmp_path / "o0", progress=False, log=lambda _: None)
    assert e.value.exit_code == ExitCode.USAGE_ERROR and not (tmp_path / "o0").exists()

    arc = write_task(tmp_path / "tasks", "tiny_arc", ARC_YAML, arc_rows())
    sampled = arc.with_name("sampled.yaml")
    data = write_jsonl(tmp_path / "math.jsonl", [{"question": "1 plus 1", "answer": "2"}])
    sampled.write_text(MATH_YAML.format(data=data).replace("tiny_math", "sampled")
                       .replace("do_sample: false", "do_sample: true"))
    write_suite(tmp_path / "sampled.yml", base | {"tasks": [{"name": "c", "kind": "lm_eval", "tasks": [str(sampled)]}]})
    with pytest.raises(Exception, match=r"tasks\[0\].*'sampled' asks for sampled generation") as e:
        evaluate(tmp_path / "sampled.yml", out=tmp_path / "o2", cache_path=tmp_path / "c.sqlite", progress=False,
                 log=lambda _: None)
    assert e.value.exit_code == ExitCode.USAGE_ERROR


@pytest.mark.e2e
def test_registry_task_without_the_hub_names_its_dataset(tmp_path, tiny_model_dir, capsys):
    """lm-eval's registry (indexed once, ~15 s): an unknown name gets a suggestion, arc_easy (data on
    the hub, unreachable here) an error naming allenai/ai2_arc and the local-files recipe."""
    from evalkit.cli import main

    base = {"name": "hub", "base": {"path": str(tiny_model_dir)}, "variants": [{"name": "base"}]}
    write_suite(tmp_path / "hub.yml", base | {"tasks": [{"name": "c", "kind": "lm_eval",
                                                         "tasks": ["arc_easy", "arc_esy"]}]})
    assert main(["run", str(tmp_path / "hub.yml"), "--out", str(tmp_path / "o")]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert "hub.yml:" in err and "tasks[0].tasks" in err and "unknown lm-eval task 'arc_esy'" in err
    assert "did you mean 'arc_easy'" in err
    write_suite(tmp_path / "hub.yml", base | {"tasks": [{"name": "c", "kind": "lm_eval", "tasks": ["arc_easy"]}]})
    assert main(["run", str(tmp_path / "hub.yml"), "--out", str(tmp_path / "o")]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert "could not load dataset 'allenai/ai2_arc' (ARC-Easy) from the Hugging Face hub" in err
    assert "dataset_path: json" in err
    assert "Traceback" not in err
