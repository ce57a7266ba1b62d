"""First contact (issue 30): what a newcomer writes from the README works, through the CLI.

Numbers as people write them (`2e-4`), one row shape for evaluation and training, and the chat
template used (or not) explicitly. The other findings: the README's own blocks (test_readme.py),
training_health and length_match (test_pitfalls.py), leakage gated by default and counted as cases
(test_trainers.py::test_evalkit_run_trains_a_suite_variant_and_gates_on_leakage), `evalkit init`
(test_init.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import cli, write_jsonl

from evalkit.errors import ExitCode
from evalkit.rows import parse_row
from trainers.data import load_training_rows
from trainers.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a sentiment task as a newcomer writes it: prompt text and a label
ROWS = [{"id": f"r{i}", "prompt": f"Review: {'great, loved it' if i % 2 else 'awful, hated it'} ({i}). Sentiment?",
         "target": "positive" if i % 2 else "negative"} for i in range(8)]


def test_numbers_as_the_guides_write_them(capsys, tmp_path, tiny_model_dir):
    """`learning_rate: 2e-4` (YAML 1.1 reads it as text for want of a dot) is the number 0.0002, in a
    recipe and in a suite, and `evalkit validate` checks the recipe before anything runs."""
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    (tmp_path / "recipe.yml").write_text(f"method: lora\nbase: {{path: {tiny_model_dir}}}\n"
                                         "data: {train: train.jsonl}\noutput: out\n"
                                         "training: {learning_rate: 2e-4, max_grad_norm: 1E0}\n")
    assert load_recipe(tmp_path / "recipe.yml").training.learning_rate == 2e-4
    (tmp_path / "s.yml").write_text(
        f"name: s\nbase: {{path: {tiny_model_dir}}}\nvariants:\n  - {{name: base}}\n"
        "  - {name: lora, train: recipe.yml}\ntasks:\n"
        "  - {name: t, data: test.jsonl, scorers: [exact_match], template: chat}\n"
        "gates:\n  - {metric: t.exact_match, min: 5e-1}\n")
    code, text = cli(capsys, "validate", str(tmp_path / "s.yml"))
    assert code == 0, text
    assert "checked recipe" in text and "8 training rows" in text
    # a string field still takes such text when quoted, and an unquoted one is a number where text is due
    (tmp_path / "recipe.yml").write_text(f"name: 1e3\nmethod: lora\nbase: {{path: {tiny_model_dir}}}\n"
                                         "data: {train: train.jsonl}\noutput: out\n")
    code, text = cli(capsys, "validate", str(tmp_path / "s.yml"))
    assert code == ExitCode.USAGE_ERROR and "recipe.yml:1 name:" in text, text


@pytest.mark.parametrize("row, chat, answer", [
    ({"prompt": "p", "target": "t"}, False, "t"),
    ({"prompt": "p", "completion": "t"}, False, "t"),
    ({"prompt": "p", "target": {"a": 1}, "completion": '{"a": 1}'}, False, {"a": 1}),
    ({"messages": [{"role": "user", "content": "p"}], "target": "t"}, True, "t"),
    ({"messages": [{"role": "user", "content": "p"}], "completion": "t"}, True, "t"),
    ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "t"}]}, True, "t"),
    ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], "target": "t"}, True, "t"),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "t"}]}, True, "t"),
])
def test_one_row_shape_for_evaluation_and_training(tmp_path, row, chat, answer):
    """Every accepted form is read alike by a task and by a recipe: the same input, the same answer."""
    from evalkit.tasks.generation import load_cases

    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    case = load_cases(path, need_target="exact_match")[0]
    assert (case.messages is not None) == chat and case.target == answer
    trl = load_training_rows(path)[0]
    assert isinstance(trl["prompt"], list) == chat
    text = trl["completion"][0]["content"] if chat else trl["completion"]
    assert text == (answer if isinstance(answer, str) else json.dumps(answer))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "messages": [{"role": "user", "content": "p"}]}, "`messages` or `prompt`, not both"),
    ({"prompt": "p", "target": "a", "completion": "b"}, "`target` and `completion` differ"),
    ({"prompt": 3}, "`prompt` must be text"),
    ({"prompt": "p", "completion": 3}, "`completion` must be text"),
    ({"target": "t"}, "each row needs `messages` (a chat) or `prompt` (text)"),
])
def test_a_row_of_no_accepted_shape_is_refused_the_same_way_in_both_places(tmp_path, row, message):
    from evalkit.errors import ConfigError
    from evalkit.tasks.generation import load_cases

    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ok", "target": "t"}, row])
    for read in (load_cases, load_training_rows):
        with pytest.raises(ConfigError) as e:
            read(path)
        assert str(e.value).startswith("rows.jsonl:2: ") and message in str(e.value)


def test_training_rows_are_checked_at_validate_with_their_line(capsys, tmp_path, tiny_model_dir):
    """The rows evaluation takes are training rows too; one without an answer is named at its line by
    `evalkit validate`, before a run starts."""
    write_jsonl(tmp_path / "train.jsonl", [*ROWS[:3], {"id": "x", "prompt": "no answer"}])
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    (tmp_path / "recipe.yml").write_text(f"method: lora\nbase: {{path: {tiny_model_dir}}}\n"
                                         "data: {train: train.jsonl}\noutput: out\n")
    (tmp_path / "s.yml").write_text(f"name: s\nbase: {{path: {tiny_model_dir}}}\nvariants:\n  - {{name: base}}\n"
                                    "  - {name: lora, train: recipe.yml}\ntasks:\n"
                                    "  - {name: t, data: test.jsonl, scorers: [exact_match]}\n")
    code, text = cli(capsys, "validate", str(tmp_path / "s.yml"))
    assert code == ExitCode.USAGE_ERROR, text
    assert "train.jsonl:4: a training row needs its answer" in text and "from s.yml:5 variants[1].train" in text


def run_prompt_rows(capsys, tmp_path: Path, base: Path, template: str | None) -> tuple[int, str, dict]:
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    task = {"name": "t", "data": "test.jsonl", "scorers": ["exact_match"], "max_new_tokens": 2}
    if template:
        task["template"] = template
    (tmp_path / "s.yml").write_text(yaml.safe_dump({"name": "s", "base": {"path": str(base)},
                                                    "variants": [{"name": "base"}], "tasks": [task]}))
    code, text = cli(capsys, "run", str(tmp_path / "s.yml"), "--out", str(tmp_path / "run"), "-q")
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    return code, text, record


@pytest.mark.parametrize("template, rendering, warned", [(None, "raw", True), ("chat", "chat_template", False),
                                                         ("none", "raw", False)])
def test_prompt_rows_and_the_chat_template(capsys, tmp_path, tiny_model_dir, template, rendering, warned):
    """`prompt` text sent raw to a base with a chat template is warned about at its place, with the fix;
    `template: chat` sends each prompt as a user turn, `template: none` says raw is meant; the record
    says which rendering the task used."""
    code, text, record = run_prompt_rows(capsys, tmp_path, tiny_model_dir, template)
    assert code == 0, text
    warning = ("WARNING: s.yml:5 tasks[0].data: 2 of 2 cases are `prompt` text, sent raw, but the base has a chat "
               "template")
    assert (warning in text) == warned, text
    if warned:
        assert "set `template: chat` to send each prompt as one user turn" in text
    assert record["tasks"][0]["rendering"] == rendering
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|im_start|>") == (rendering == "chat_template")
    assert ROWS[0]["prompt"] in sample["prompt"]


def test_template_none_refuses_chat_rows(capsys, tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "test.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "target": "x"}])
    (tmp_path / "s.yml").write_text(f"name: s\nbase: {{path: {tiny_model_dir}}}\nvariants:\n  - {{name: base}}\n"
                                    "tasks:\n  - {name: t, data: test.jsonl, scorers: [exact_match], template: none}\n")
    code, text = cli(capsys, "validate", str(tmp_path / "s.yml"))
    assert code == ExitCode.USAGE_ERROR, text
    assert "test.jsonl:1: `template: none` sends `prompt` text raw, but this row is a chat" in text


def test_parse_row_keeps_other_keys_as_metadata():
    row = parse_row({"id": 7, "prompt": "p", "target": "t", "label": 3})
    assert row.id == "7" and row.meta == {"label": 3} and not row.is_chat
