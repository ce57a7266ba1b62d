"""`evalkit init`: the row shape and answers detected, the split, refusals, and a newcomer's first
run end to end (init, validate, run: a tiny recipe trained and scored) through the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl

from evalkit.cli import main
from evalkit.errors import ConfigError
from evalkit.init.data import classify_answers, held_out_fraction, read_rows, rows_for_test, shape_text, split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REVIEWS = {"positive": ["I loved this film", "What a great meal", "Friendly staff, fast service", "A delight to read"],
           "negative": ["I hated this film", "The meal was cold", "Rude staff, slow service", "A chore to read"]}


def sentiment_rows(n: int = 40) -> list[dict]:
    """`prompt` + `target` label rows: what a newcomer's first task often looks like."""
    labels = ["positive", "negative"]
    return [{"id": f"r{i}", "prompt": f"Is this review positive or negative? {REVIEWS[labels[i % 2]][i // 2 % 4]} "
             f"(review {i})", "target": labels[i % 2]} for i in range(n)]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------
# what the rows are


def test_json_answers_get_json_aware_exact_match_and_json_valid():
    objects = classify_answers([{"name": "Ada"}, [1, 2]])
    assert objects.kind == "json" and objects.scorers() == ["exact_match", "json_valid"]
    as_text = classify_answers(['{"name": "Ada"}', " [1, 2]"])  # JSON written as text: compared as JSON
    assert as_text.kind == "json" and as_text.scorers() == [{"exact_match": {"json": True}}, "json_valid"]
    assert classify_answers([{"name": "Ada"}, '["x"]']).scorers()[0] == {"exact_match": {"json": True}}
    assert classify_answers(['{"name": "Ada"}', "not json"]).kind != "json"


def test_short_labels_get_normalized_exact_match_unless_it_would_merge_them():
    labels = classify_answers(["positive", "negative", "Positive", "neutral"] * 5)
    assert labels.kind == "labels" and labels.main_metric == "exact_match"
    # "Positive" and "positive" are two labels here: case folding would merge them
    assert labels.scorers() == [{"exact_match": {"remove_punctuation": True}}]
    folded = classify_answers(["Yes.", "No.", "yes.", "no."][:2] * 10)
    assert folded.scorers() == [{"exact_match": {"ignore_case": True, "remove_punctuation": True}}]
    numbers = classify_answers([str(i) for i in range(30)] + ["-3", "3.5"])  # many distinct short answers
    assert numbers.kind == "short" and numbers.scorers() == [{"exact_match": {"ignore_case": True}}, "f1"]
    assert classify_answers([7, 8, 7, 8]).kind == "labels"  # any JSON scalar is its text


def test_free_text_gets_rouge_l_and_f1():
    text = classify_answers(["The meeting moved to Thursday because the room was booked.", "Yes"])
    assert text.kind == "text" and text.scorers() == ["rouge_l", "f1"] and text.main_metric == "rouge_l"


def test_row_shapes_detected(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    cases = {
        "prompt-target": ([{"prompt": "a", "target": "x"}], "`prompt` text with `target` answers"),
        "messages-target": ([{"messages": chat, "target": {"k": 1}}], "`messages` chats with `target` answers"),
        "completion": ([{"prompt": "a", "completion": " x"}], "`prompt` text with `completion` answers"),
        "assistant-turn": ([{"messages": [*chat, {"role": "assistant", "content": "hello"}]}],
                           "`messages` chats with a final assistant turn"),
        "mixed": ([{"prompt": "a", "target": "x"}, {"messages": chat, "target": "y"}, {"prompt": "b", "target": "z"}],
                  "`prompt` text (2) / `messages` chats (1) with `target` answers"),
    }
    for name, (rows, shape) in cases.items():
        got = read_rows(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert shape_text(got) == shape, name
    rows = read_rows(write_jsonl(tmp_path / "a.jsonl", [{"messages": [*chat, {"role": "assistant", "content": "hello"}]}]))
    assert rows[0].row.answer == "hello" and rows[0].row.messages == tuple(chat)


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "a"}, "no answer: training needs one"),
    ({"prompt": 3, "target": "x"}, "`prompt` must be text"),
    ({"question": "a", "answer": "x"}, "each row needs `messages` (a chat) or `prompt`"),
    ({"id": "r0", "prompt": "b", "target": "y"}, "duplicate id 'r0' (first at line 1)"),
])
def test_a_bad_row_is_located(tmp_path, capsys, bad, message):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": "r0", "prompt": "a", "target": "x"}, {"prompt": "c", "target": "z"}])
    data.write_text(data.read_text() + "\n" + json.dumps(bad) + "\n")  # line 4: a blank line is skipped
    with pytest.raises(ConfigError, match=r"rows\.jsonl:4: ") as e:
        read_rows(data)
    assert message in str(e.value)
    code, _, err = run_cli(capsys, "init", "--data", str(data), "--dir", str(tmp_path / "out"))
    assert code == 4 and f"rows.jsonl:4: {message}" in err and not (tmp_path / "out").exists()


def test_split_is_seeded_verbatim_and_keeps_an_input_on_one_side(tmp_path):
    rows = sentiment_rows(40)
    rows[5]["prompt"] = rows[6]["prompt"] = rows[7]["prompt"] = "the same review"  # must not straddle
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, indent=None, separators=(",", ":")) + "\r\n" for r in rows))
    read = read_rows(path)
    train, test = split(read, rows_for_test(len(read)))
    assert len(test) >= 10 and len(train) + len(test) == 40
    assert split(read, 10) == (train, test)  # seeded
    same = {r.line for r in read if r.row.prompt == "the same review"}
    assert same <= {r.line for r in train} or same <= {r.line for r in test}
    assert all(r.text.decode() == json.dumps(rows[r.line - 1], separators=(",", ":")) for r in read)
    assert [rows_for_test(n) for n in (2, 8, 40, 200, 5000)] == [1, 4, 10, 40, 200]
    assert [held_out_fraction(n) for n in (19, 30, 100, 1000)] == [0.0, 0.2, 0.08, 0.05]


def test_the_schema_line_only_where_it_moves_with_the_files(tmp_path):
    """An editor's `$schema` line is written when the folder shares a project with evalkit's schema
    (a checkout, a virtual environment inside the project), never as a climb from a stranger's folder."""
    from evalkit.init.files import schema_line

    schema = Path(__file__).resolve().parents[1] / "evalkit" / "config" / "suite.schema.json"
    assert schema_line(schema, schema.parents[2] / "suites" / "mine") == (
        "# yaml-language-server: $schema=../../evalkit/config/suite.schema.json\n")
    assert schema_line(schema, tmp_path) == "" and schema_line(tmp_path / "none.json", tmp_path) == ""


# ------------------------------------------------------------------------------------------------
# the command


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(12))
    (tmp_path / "suite.yml").write_text("name: mine\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("{}\n")
    code, _, err = run_cli(capsys, "init", "--data", str(data), "--dir", str(tmp_path))
    assert code == 4 and "would overwrite" in err and "suite.yml" in err and "test.jsonl" in err and "--force" in err
    assert (tmp_path / "suite.yml").read_text() == "name: mine\n" and not (tmp_path / "recipe.yml").exists()
    # the split would overwrite the data file itself: refused even with --force
    code, _, err = run_cli(capsys, "init", "--data", str(tmp_path / "data" / "test.jsonl"), "--dir", str(tmp_path),
                           "--force")
    assert code == 4 and "would overwrite its input" in err


def test_a_dir_that_is_a_file_is_refused_not_a_traceback(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(12))
    code, _, err = run_cli(capsys, "init", "--data", str(data), "--dir", str(data))
    assert code == 4 and f"--dir {data}: not a folder" in err
    code, _, err = run_cli(capsys, "init", "--data", str(data), "--dir", str(data / "x"), "--base", str(tiny_model_dir))
    assert code == 4 and f"cannot write {data / 'x'}" in err and "Traceback" not in err


def test_a_base_that_cannot_be_read_is_refused_before_anything_is_written(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(12))
    code, _, err = run_cli(capsys, "init", "--data", str(data), "--base", "./no-such-model", "--dir", str(tmp_path / "a"))
    assert code == 4 and "--base ./no-such-model: no such model folder" in err
    code, _, err = run_cli(capsys, "init", "--data", str(data), "--base", "no-org/no-model", "--dir", str(tmp_path / "a"))
    assert code == 4 and "--base no-org/no-model: cannot load model" in err and "give a local model folder" in err
    assert not (tmp_path / "a").exists()


def test_chat_rows_with_a_test_file_and_json_targets(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`messages` rows need no template key; --test files are referenced where they are, relative to
    the suite; JSON targets get json_valid and a gate on it; --force rewrites."""
    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Give {{\"n\": {i}}} as JSON."}],
             "target": {"n": i}} for i in range(30)]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "train.jsonl", rows[:24])
    write_jsonl(tmp_path / "in" / "test.jsonl", rows[24:])
    monkeypatch.chdir(tmp_path)
    argv = ["init", "--data", "in/train.jsonl", "--test", "in/test.jsonl", "--base", str(tiny_model_dir), "--dir", "out"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, out + err
    assert "detected rows: 24 in train.jsonl, 6 in test.jsonl: `messages` chats with `target` answers" in out
    assert "evalkit validate out/suite.yml" in out and not (tmp_path / "out" / "data").exists()
    suite, recipe = (yaml.safe_load((tmp_path / "out" / name).read_text()) for name in ("suite.yml", "recipe.yml"))
    task = suite["tasks"][0]
    assert task["data"] == "../in/test.jsonl" and "template" not in task and task["name"] == "train"
    assert task["scorers"] == ["exact_match", "json_valid"]
    assert {"metric": "train.json_valid", "min": 0.9} in suite["gates"]
    assert recipe["data"] == {"train": "../in/train.jsonl", "eval_fraction": 0.2, "check_against": ["../in/test.jsonl"]}
    out_dir = tmp_path / "out"  # the base path as written resolves against the files' folder
    assert (out_dir / suite["base"]["path"]).resolve() == tiny_model_dir.resolve() == (out_dir / recipe["base"]["path"]).resolve()
    assert recipe["training"]["learning_rate"] == 6.0e-4 and "max_steps" not in recipe["training"]
    assert run_cli(capsys, *argv)[0] == 4
    assert run_cli(capsys, *argv, "--force")[0] == 0


def test_prompt_rows_on_a_base_without_chat_template_are_sent_raw(tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "completion-model"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(20))
    code, out, err = run_cli(capsys, "init", "--data", str(data), "--base", str(base), "--dir", str(tmp_path / "a"))
    assert code == 0, out + err
    assert "no chat template: `prompt` text is sent raw (template: none)" in out
    assert yaml.safe_load((tmp_path / "a" / "suite.yml").read_text())["tasks"][0]["template"] == "none"
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "target": "x"}] * 2)
    code, out, err = run_cli(capsys, "init", "--data", str(chats), "--base", str(base), "--dir", str(tmp_path / "b"))
    assert code == 4 and "chats.jsonl:1: this row is a chat (`messages`), but the base" in err


def test_init_validate_run_end_to_end(learnable_tiny_dir, tmp_path, capsys, monkeypatch):
    """A newcomer's first run: `evalkit init` on 40 sentiment rows in a fresh folder, then validate
    and run. The written recipe trains (12 steps on the tiny model), both variants are scored with
    the chat template, every gate is evaluated and none errors."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(40))
    code, out, err = run_cli(capsys, "init", "--data", "rows.jsonl", "--base", str(learnable_tiny_dir))
    assert code == 0, out + err
    for line in ("detected rows: 40 in rows.jsonl: `prompt` text with `target` answers",
                 "has a chat template: `prompt` rows are sent as one user turn (template: chat)",
                 "split: 10 test rows, 30 training rows (20% of the rows, at least 10, at most 200",
                 "wrote suite.yml", "wrote recipe.yml", "wrote data/train.jsonl: 30 training rows",
                 "validated suite.yml: ok\n  checked recipe recipe.yml (lora): 30 training rows in data/train.jsonl",
                 "next:\n  evalkit validate suite.yml\n  evalkit run suite.yml"):
        assert line in out, out
    suite_text = (tmp_path / "suite.yml").read_text()
    suite = yaml.safe_load(suite_text)
    assert suite["tasks"][0]["template"] == "chat" and "\n    template: chat\n" in suite_text
    assert suite["tasks"][0]["scorers"] == [{"exact_match": {"ignore_case": True, "remove_punctuation": True}}]
    assert suite["variants"] == [{"name": "base"}, {"name": "lora", "train": "recipe.yml"}]
    recipe = yaml.safe_load((tmp_path / "recipe.yml").read_text())
    assert recipe["data"]["template"] == "chat" and recipe["output"] == "runs/adapter"
    assert "learning_rate: 6.0e-4" in (tmp_path / "recipe.yml").read_text()
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    split_lines = [*(tmp_path / "data" / "train.jsonl").read_text().splitlines(),
                   *(tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    assert sorted(split_lines) == sorted(lines)  # copied verbatim, each once

    code, out, err = run_cli(capsys, "validate", "suite.yml")
    assert code == 0 and "suite.yml: ok (2 variants, 1 tasks" in out, out + err

    code, out, err = run_cli(capsys, "run", "suite.yml", "-q", "--out", "run")
    assert code in (0, 1), out + err  # a verdict either way: the gates were evaluated
    assert "raw, but the base has a chat template" not in err  # template: chat says how prompts are sent
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "report.html").is_file()
    assert {t["name"]: t.get("rendering") for t in results["tasks"]} == {"rows": "chat_template"}
    provenance = json.loads((tmp_path / "runs" / "adapter" / "evalkit_train.json").read_text())
    assert provenance["steps"] == 12 and provenance["recipe"]["data"]["template"] == "chat"
    gates = {g["id"]: g for g in results["gates"]}
    assert set(gates) == {"rows.exact_match-vs-base[lora]", "training_health[lora]", "length_match[lora]",
                          "stops_generating[lora]", "no_leakage[lora]"}, sorted(gates)
    for gate in gates.values():  # each checked what it says, none skipped or unable to run
        assert not gate.get("skipped") and gate["message"] and "error" not in gate["message"].lower(), gate
    assert gates["no_leakage[lora]"]["passed"], gates["no_leakage[lora]"]["message"]
