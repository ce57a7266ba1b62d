"""Leakage between eval cases and training rows (evalkit.leakage): pure, fast."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalkit.checks.training import leakage
from evalkit.config.task import GenerateTask
from evalkit.leakage import NORMALIZATION, adapter_overlap, find_overlap, normalize, row_key, train_index
from evalkit.types import Case

REPO = Path(__file__).resolve().parent.parent


def user(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_normalize_ignores_case_space_and_outer_punctuation():
    assert normalize("  Hello,\n  WORLD!! ") == normalize("hello world") == "hello world"
    assert normalize("Ｆｕｌｌｗｉｄｔｈ") == "fullwidth"  # NFKC
    assert normalize("2+3") != normalize("2-3")  # punctuation inside a token is kept
    assert normalize("it's") == "it's"


def test_key_skips_system_turns_and_the_trailing_answer():
    chat = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris"}]}
    assert row_key(chat) == row_key(user("capital of france")) == "capital of france"
    assert row_key({"prompt": "Capital of France?", "completion": "Paris"}) == "capital of france"
    assert row_key({"prompt": [{"role": "user", "content": "Capital of France?"}]}) == "capital of france"


def test_find_overlap_pairs_eval_and_train_ids():
    train = [user("What is 2+3?", id="t0", target="5"), user("Name a colour", id="t1"),
             user("what is 2+3", id="t2", target="five")]
    evals = [user("WHAT IS 2+3 ?", id="e0"), user("What is 2-3?", id="e1"), user("", id="e2")]
    assert find_overlap(evals, train) == [("e0", "t0"), ("e0", "t2")]
    assert find_overlap(evals, train_index(train)) == [("e0", "t0"), ("e0", "t2")]  # stored index, same answer


def test_find_overlap_accepts_cases_and_rows_without_ids():
    cases = [Case(id="c1", messages=({"role": "user", "content": "Name a colour."},)), Case(id="c2", prompt="other")]
    assert find_overlap(cases, [user("name a colour")]) == [("c1", "#0")]


def test_index_is_json_serializable_and_read_back_from_provenance():
    index = train_index([user("a b", id="x"), user("A, B!", id="y")])
    assert json.loads(json.dumps(index)) == {next(iter(index)): ["x", "y"]}
    provenance = {"data": {"train_index": index, "train_index_normalization": NORMALIZATION}}
    assert adapter_overlap([user("a  B.", id="e")], provenance) == [("e", "x"), ("e", "y")]
    assert adapter_overlap([user("a b")], {"data": {}}) is None  # no index recorded: cannot tell
    assert adapter_overlap([user("a b")], None) is None


def test_bundled_demo_data_does_not_leak():
    def rows(name):
        return [json.loads(line) for line in (REPO / "suites" / "data" / name).read_text().splitlines()]
    train, test = rows("extract_train.jsonl"), rows("extract_test.jsonl")
    assert find_overlap(test, train) == []
    assert find_overlap(test[:1], train + test[:1]) == [(test[0]["id"], test[0]["id"])]


@pytest.mark.parametrize("normalization", [NORMALIZATION, "v0"])
def test_run_check_reads_the_trainer_index_through_adapter_overlap(tmp_path, normalization):
    """The runner's no_leakage check reads `data.train_index` as trainers/sft.py writes it, and an index
    made with another normalization is no index (adapter_overlap's None): skipped with the reason, never
    compared. Leaked cases are counted as cases, not as case-row pairs."""
    rows = [user("What is 2+3?", id="e0"), user("Name a colour", id="e1")]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({**r, "target": "x"}) + "\n" for r in rows))
    index = train_index([user("what is 2+3", id="t7"), user("What is 2 + 3?", id="t8"), user("WHAT IS 2+3", id="t9")])
    provenance = {"data": {"train_index": index, "train_index_normalization": normalization}}
    ctx = SimpleNamespace(
        suite=SimpleNamespace(tasks=[GenerateTask.model_construct(name="extract", data=tmp_path / "eval.jsonl")]),
        variants=[SimpleNamespace(name="base", info=None),
                  SimpleNamespace(name="lora", info=SimpleNamespace(provenance=provenance)),
                  SimpleNamespace(name="bought", info=SimpleNamespace(provenance=None))])
    records = leakage(ctx, lambda msg: None)
    by_variant = {r.variant: r for r in records}
    assert by_variant["bought"].skipped and "no provenance" in by_variant["bought"].skipped
    lora = by_variant["lora"]
    if normalization == NORMALIZATION:
        assert not lora.passed and not lora.skipped
        assert lora.details["leaked_cases"] == {"extract": 1}
        assert [o["train_id"] for o in lora.details["overlaps"]] == ["t7", "t9"]  # "2 + 3" is another text
        assert lora.message.startswith("extract: 1 of 2 eval cases also in the training data of 'lora' (2 training "
                                       "rows match): e0 (train t7, t9)")
    else:
        assert lora.passed and lora.skipped
        assert f"no training-data index made with normalization {NORMALIZATION}" in lora.skipped
