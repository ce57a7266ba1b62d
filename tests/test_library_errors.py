"""What peft, transformers, safetensors and gguf raise on a user's files becomes a located exit 4:
a target module the base lacks, a `gguf:` file that is not one (or is cut short), a broken base or
adapter folder. And the two forms of one model (its GGUF, the folder converted from it) are one base."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import EMBEDDED_GGUF
from helpers import make_adapter, write_jsonl, write_suite

from evalkit.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"id": f"r{i}", "prompt": f"Say {i}:", "completion": f" {i}"} for i in range(4)]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def refused(code: int, text: str, *expected: str) -> None:
    """Exit 4, every expected piece in the output, and no traceback."""
    assert code == 4 and "Traceback" not in text, text
    for piece in expected:
        assert piece in text, (piece, text)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lib-errors") / "lora", seed=1)


def suite(tmp_path: Path, base: dict, adapter: Path | None = None) -> Path:
    """A one-case suite; line 2 is `base:`, and the adapter's `adapter:` line is 7."""
    write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "prompt": "Say 1:", "target": "1"}])
    variants = [{"name": "base"}] + ([{"name": "x", "adapter": str(adapter)}] if adapter else [])
    return write_suite(tmp_path / "suite.yml", {
        "name": "s", "base": base, "variants": variants,
        "tasks": [{"name": "t", "data": "data.jsonl", "scorers": ["exact_match"], "max_new_tokens": 2}]})


def run(capsys, tmp_path: Path, suite_path: Path) -> tuple[int, str]:
    return cli(capsys, "run", str(suite_path), "--out", str(tmp_path / "run"), "-q", "--no-cache")


# ------------------------------------------------------------------------------------------------
# a recipe's target modules


def recipe(tmp_path: Path, base: Path | str, targets: str, base_kind: str = "path") -> Path:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    path = tmp_path / "recipe.yml"
    path.write_text(f"name: targets\nmethod: lora\nbase: {{{base_kind}: {json.dumps(str(base))}}}\n"
                    f"data:\n  train: train.jsonl\noutput: out/adapter\nlora:\n  r: 4\n"
                    f"  target_modules: {targets}\n"  # line 9
                    "training: {max_steps: 1, batch_size: 2, max_length: 64}\n")
    return path


LINEAR = "its linear modules are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"


@pytest.mark.parametrize("targets, message", [
    ("[q_proj, no_such_proj]", f"recipe.yml:9 lora.target_modules: ['no_such_proj'] not found in the base; {LINEAR}"),
    ("[mlp]", f"recipe.yml:9 lora.target_modules: LoRA adapts linear, embedding and convolution layers: "
              f"'mlp' is a LlamaMLP; {LINEAR}"),
    ("'.*\\.nope'", "recipe.yml:9 lora.target_modules: '.*\\\\.nope' matches no layer of the base LoRA can adapt"),
    ("'(unclosed'", "recipe.yml:9 lora.target_modules: '(unclosed' is not a valid regular expression"),
], ids=["missing", "not-a-layer", "regex-matches-nothing", "bad-regex"])
def test_target_modules_the_base_lacks_are_refused_at_their_line(capsys, tmp_path, tiny_model_dir, targets, message):
    code, text = cli(capsys, "train", str(recipe(tmp_path, tiny_model_dir, targets)))
    refused(code, text, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no adapter, no temp folder


def test_peft_refusing_target_modules_is_located_too(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """The check before training has a net at peft's call site: with the check off, peft's own
    error is reported at the same line (not a traceback)."""
    import trainers.sft

    monkeypatch.setattr(trainers.sft, "check_target_modules", lambda recipe, model: None)
    code, text = cli(capsys, "train", str(recipe(tmp_path, tiny_model_dir, "[no_such_proj]")))
    refused(code, text, "recipe.yml:9 lora.target_modules: peft: Target modules {'no_such_proj'} not found in the "
                        f"base model. Please check the target modules and try again; {LINEAR}")


def test_a_suite_training_a_recipe_with_a_bad_target_names_the_recipe_line_and_the_suite(
        capsys, tmp_path, tiny_model_dir):
    path = recipe(tmp_path, tiny_model_dir, "[q_proj, v_porj]")
    write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "prompt": "Say 1:", "target": "1"}])
    suite_path = write_suite(tmp_path / "suite.yml", {
        "name": "s", "base": {"path": str(tiny_model_dir)}, "variants": [{"name": "base"}, {"name": "x", "train": str(path)}],
        "tasks": [{"name": "t", "data": "data.jsonl", "scorers": ["exact_match"], "max_new_tokens": 2}]})
    code, text = run(capsys, tmp_path, suite_path)
    refused(code, text, "recipe.yml:9 lora.target_modules: ['v_porj'] not found in the base", "suite.yml:7 variants[1].train")


# ------------------------------------------------------------------------------------------------
# a `gguf:` base that is not a GGUF file


def _embedded_gguf() -> Path:
    from evalkit.models.base import resolve_pkg_path

    return resolve_pkg_path(EMBEDDED_GGUF)


@pytest.mark.parametrize("content, message", [
    (b"hello, I am a text file\n", "is not a GGUF file: it starts with b'hell', not b'GGUF'"),
    (b"", "is not a GGUF file: it is empty"),
    (None, "cannot read this GGUF file (truncated or corrupt?): its header is cut short or corrupt: "
            "unpack_from requires a buffer"),
], ids=["text", "empty", "truncated"])
def test_a_gguf_base_that_is_not_one_is_refused_at_the_base_line(capsys, tmp_path, content, message):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content if content is not None else _embedded_gguf().read_bytes()[:1 << 20])  # cut in its header
    code, text = run(capsys, tmp_path, suite(tmp_path, {"gguf": str(gguf)}))
    refused(code, text, f"suite.yml:2 base: {gguf} {message}" if content is not None else
            f"suite.yml:2 base: {gguf}: {message}")


def test_a_recipe_with_a_gguf_base_that_is_not_one(capsys, tmp_path):
    (tmp_path / "model.gguf").write_text("not a model\n")
    code, text = cli(capsys, "train", str(recipe(tmp_path, tmp_path / "model.gguf", "[q_proj]", base_kind="gguf")))
    refused(code, text, "recipe.yml:3 base: ", "model.gguf is not a GGUF file")


# ------------------------------------------------------------------------------------------------
# broken base and adapter folders


def _broken_base(tmp_path: Path, tiny_model_dir: Path, how: str) -> Path:
    folder = tmp_path / "base"
    shutil.copytree(tiny_model_dir, folder)
    if how == "config":
        (folder / "config.json").write_text('{"model_type": "llama",')
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    else:
        blob = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    return folder


@pytest.mark.parametrize("how, message", [
    ("config", "is not a valid JSON file"),
    ("no-weights", "no file named model.safetensors"),
    ("cut-weights", "SafetensorError: Error while deserializing header"),
])
def test_a_broken_base_folder_is_refused_at_the_base_line(capsys, tmp_path, tiny_model_dir, how, message):
    folder = _broken_base(tmp_path, tiny_model_dir, how)
    code, text = run(capsys, tmp_path, suite(tmp_path, {"path": str(folder)}))
    refused(code, text, f"suite.yml:2 base: cannot load model '{folder}'", message)


@pytest.mark.parametrize("how, message", [
    ("json", "adapter_config.json:2: invalid JSON"),
    ("array", "adapter_config.json:1: an adapter config must be a JSON object, not list"),
    ("peft-type", "adapter_config.json: peft_type 'LORRA' is not an adapter type peft"),
    ("unknown-type", "adapter_config.json: peft_type 'NOSUCH' is not an adapter type peft"),
    ("weights", "adapter_model.safetensors: corrupt or unreadable safetensors file (Error while deserializing header"),
])
def test_a_broken_adapter_folder_is_refused_at_the_adapter_line(capsys, tmp_path, lora, how, message, tiny_model_dir):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if how == "json":
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA",\n')
    elif how == "array":
        (adapter / "adapter_config.json").write_text("[1, 2]\n")
    elif how in ("peft-type", "unknown-type"):
        typo = "LORRA" if how == "peft-type" else "NOSUCH"
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"peft_type": typo}))
    else:
        (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code, text = run(capsys, tmp_path, suite(tmp_path, {"path": str(tiny_model_dir)}, adapter))
    located = "suite.yml:7 variants[1].adapter" if how not in ("json", "array") else "from suite.yml:7 variants[1].adapter"
    refused(code, text, message, located)
    if how == "peft-type":
        assert "did you mean 'LORA'?" in text
    if how == "unknown-type":
        assert "a LoRA or DoRA adapter has peft_type 'LORA'" in text


# ------------------------------------------------------------------------------------------------
# two forms of one model are one base


def test_the_converted_folder_is_the_same_base_as_its_gguf(embedded_base, embedded_model_dir):
    from evalkit.models import BaseSpec, resolve_base

    as_folder = resolve_base(BaseSpec.of("path", str(embedded_model_dir)))
    assert as_folder.sha256 == embedded_base.sha256 and as_folder.path == embedded_base.path


def _converted(tmp_path: Path, tiny_model_dir: Path, digest: str) -> Path:
    """The tiny model as if evalkit had converted it from a GGUF with content hash `digest`."""
    from evalkit.models.base import SOURCE_FILE, dir_sha256

    folder = tmp_path / "cache-models" / digest[:32]
    shutil.copytree(tiny_model_dir, folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"gguf": "tiny.gguf", "sha256": digest,
                                                  "content_sha256": dir_sha256(folder)}))
    return folder


def test_an_adapter_trained_on_the_gguf_runs_on_the_converted_folder_not_on_a_changed_one(
        capsys, tmp_path, tiny_model_dir, lora):
    digest = "ab" * 32
    folder = _converted(tmp_path, tiny_model_dir, digest)
    adapter = tmp_path / "adapter"
    shutil.copytree(lora, adapter)
    elsewhere = f"/home/someone/.cache/evalkit/models/{digest[:32]}"  # the GGUF's folder in the trainer's cache
    (adapter / "evalkit_train.json").write_text(json.dumps({"base": {
        "kind": "gguf", "ref": "pkg:some_pkg/tiny.Q4_1.gguf", "path": elsewhere, "sha256": digest}}))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": elsewhere}))

    code, text = run(capsys, tmp_path, suite(tmp_path, {"path": str(folder)}, adapter))
    assert code == 0, text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["base"]["sha256"] == digest

    config = json.loads((folder / "config.json").read_text())  # the folder is changed: another base now
    (folder / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-3}))
    shutil.rmtree(tmp_path / "run")
    code, text = run(capsys, tmp_path, suite(tmp_path, {"path": str(folder)}, adapter))
    refused(code, text, "suite.yml:7 variants[1].adapter", f"was trained on a base with content hash {digest[:12]}")


def test_a_folder_converted_before_content_hashes_gets_one(tmp_path, tiny_model_dir, monkeypatch):
    """A cache folder from before converted folders recorded their content: the next resolve of its
    GGUF records it, and from then on the folder is the same base as the GGUF."""
    from evalkit.models import BaseSpec, resolve_base
    from evalkit.models.base import SOURCE_FILE, convert_gguf

    monkeypatch.setenv("EVALKIT_CACHE_DIR", str(tmp_path / "cache"))
    digest = "cd" * 32
    folder = tmp_path / "cache" / "models" / digest[:32]
    shutil.copytree(tiny_model_dir, folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"gguf": "tiny.gguf", "sha256": digest}))
    assert resolve_base(BaseSpec.of("path", str(folder))).sha256 != digest  # unproven: its own content
    assert convert_gguf(Path("tiny.gguf"), digest) == folder
    assert resolve_base(BaseSpec.of("path", str(folder))).sha256 == digest
