"""The shared plumbing: one JSONL reader (located errors), atomic writes, package versions, the
chat-template hash and peak memory, as every caller sees them."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalkit.errors import ConfigError
from evalkit.fileio import atomic_write, iter_jsonl, read_jsonl


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes('\ufeff{"a": 1}\n\n  \n{"b": "x\u2028y"}\r\n[1]\n'.encode())
    assert list(iter_jsonl(p)) == [(1, {"a": 1}), (4, {"b": "x\u2028y"}), (5, [1])]
    with pytest.raises(ConfigError, match=r"^d.jsonl:5: each line must be a JSON object, not an array$"):
        read_jsonl(p)


@pytest.mark.parametrize(("content", "message"), [
    (b'{"a": 1}\n{"a": 1, b}\n', r"^d.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes "
                                 r"\(column 10\)$"),
    (b'{"a": 1}\n{"a": "caf\xe9"}\n', r"^d.jsonl:2: not UTF-8 text: byte 0xe9 at byte 11 of the line\n  hint: "),
    (b'{"a": "\xff\xfe"}\n', r"^d.jsonl:1: not UTF-8 text: byte 0xff"),
], ids=["json", "latin-1", "utf-16-bom"])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        list(iter_jsonl(p))
    assert (e.value.file, e.value.__cause__, e.value.__suppress_context__) == (p, None, True)  # no traceback chain


def test_jsonl_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"file not found: .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="cannot read"):
        read_jsonl(tmp_path)


def test_every_jsonl_caller_reports_a_non_utf8_line(tmp_path):
    """The four readers (suite data, judge anchors, training rows, MMLU rows) share the located error."""
    from evalkit.tasks import judge
    from evalkit.tasks.generation import load_cases
    from evalkit.tasks.mmlu_data import load_questions
    from trainers.data import load_training_rows

    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'{"prompt": "a", "target": "b", "completion": "b", "output": "b", "label": 3}\n{"prompt": "\xe9"}\n')
    jt = SimpleNamespace(mode="rubric", scale=(1.0, 5.0))
    for read in (load_cases, lambda f: judge._load_anchors(f, jt), load_training_rows,
                 lambda f: load_questions({"path": str(f), "format": "jsonl"})):
        with pytest.raises(ConfigError, match=r"^rows.jsonl:2: not UTF-8 text"):
            read(p)


def test_callers_keep_their_row_checks(tmp_path):
    from evalkit.tasks import judge
    from evalkit.tasks.generation import load_cases
    from evalkit.tasks.mmlu_data import load_questions
    from trainers.data import load_training_rows

    p = tmp_path / "rows.jsonl"
    p.write_text('{"target": 1}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl:1: each row needs `messages` \(a chat\) or `prompt`"):
        load_cases(p)
    with pytest.raises(ConfigError, match=r"rows.jsonl:1: each row needs 'messages' or 'prompt'"):
        judge._load_anchors(p, SimpleNamespace(mode="rubric", scale=(1.0, 5.0)))
    with pytest.raises(ConfigError, match=r"rows.jsonl:1: each row needs `messages` \(a chat\) or `prompt`"):
        load_training_rows(p)  # the same row shape as evaluation (evalkit.rows)
    p.write_text("")
    with pytest.raises(ConfigError, match=r"rows\.jsonl: no rows"):
        load_training_rows(p)
    # MMLU drops malformed rows (a non-object among them) and counts them
    row = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "anatomy"}
    p.write_text(json.dumps(row) + '\n[1, 2]\n"x"\n')
    loaded = load_questions({"path": str(p), "format": "jsonl"})
    assert (len(loaded.questions), loaded.skipped) == (1, 2)


def test_load_cases_stops_reading_at_the_limit(tmp_path):
    from evalkit.tasks.generation import load_cases

    p = tmp_path / "rows.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\nnot json\n')
    assert [c.prompt for c in load_cases(p, limit=2)] == ["a", "b"]


def test_atomic_write_replaces_whole_and_keeps_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, "old")
    atomic_write(target, (c for c in ["n", b"e", "w"]))
    assert target.read_text() == "new" and os.listdir(target.parent) == ["f.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask

    def boom():
        yield "partial"
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom())
    assert target.read_text() == "new" and os.listdir(target.parent) == ["f.txt"]  # no temp file left


def test_run_record_and_provenance_read_versions_one_way():
    import platform

    from evalkit.environment import environment, package_versions
    from trainers.provenance import RECORDED_LIBRARIES, recorded_versions

    env = environment("cpu")
    assert env["python"] == platform.python_version() and env["device"] == "cpu"
    assert env["packages"]["lm_eval"] == package_versions(["lm-eval"])["lm-eval"] is not None
    assert package_versions(["surely-not-installed-pkg"]) == {"surely-not-installed-pkg": None}
    versions = recorded_versions()
    assert list(versions) == ["python", *RECORDED_LIBRARIES]
    assert {k: env["packages"][k] for k in RECORDED_LIBRARIES} == {k: versions[k] for k in RECORDED_LIBRARIES}


def test_template_hash_one_definition():
    import trainers
    from evalkit import context
    from evalkit.types import template_hash

    text = "{{ messages }}"
    sha = hashlib.sha256(text.encode()).hexdigest()
    assert template_hash(text) == template_hash(SimpleNamespace(chat_template=text)) == sha
    assert template_hash(None) == template_hash(SimpleNamespace(chat_template=None)) == template_hash(object()) == ""
    named = {"default": text, "tool_use": "x"}
    assert template_hash(named) == template_hash(SimpleNamespace(chat_template=named)) != sha
    assert trainers.template_hash is context.template_hash is template_hash


def test_peak_memory_on_cpu_sees_a_short_allocation():
    from evalkit.memory import PeakMemory, max_rss_bytes, rss_bytes

    now = rss_bytes()
    assert now is not None and now > 2**20
    assert max_rss_bytes() > now / 2  # same unit (bytes): a KiB count would read 1024 times smaller
    start = rss_bytes()
    assert start is not None
    with PeakMemory("cpu", interval_s=0.001) as peak:
        # fresh pages from the kernel: a malloc'd block may reuse heap memory earlier tests freed,
        # which is resident already, and the resident size would not rise (seen in CI, random order)
        import mmap

        block = mmap.mmap(-1, 256 * 2**20)
        for i in range(0, len(block), 4096):  # touch every page so it is resident
            block[i] = 1
        import time

        # the sampler is a thread: on 2 busy cores it may wait its turn, so give it up to 5 s to look
        deadline = time.monotonic() + 5
        while peak._peak < start + 128 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        block.close()
    # other threads of this process (servers of earlier tests) move the RSS by a few MB: a wide margin
    assert peak.source == "cpu_peak_rss" and peak.mb >= start / 2**20 + 128


def test_peak_memory_falls_back_to_the_lifetime_peak(monkeypatch):
    from evalkit import memory

    monkeypatch.setattr(memory, "rss_bytes", lambda: None)
    with memory.PeakMemory("cpu") as peak:
        pass
    assert peak.source == "cpu_maxrss" and 0 < peak.mb * 2**20 <= memory.max_rss_bytes()


@pytest.mark.skipif(sys.platform == "win32", reason="no resource module")
def test_max_rss_unit(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS: the lifetime peak comes back in bytes on both."""
    import resource

    from evalkit import memory

    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=1000))
    monkeypatch.setattr(memory.sys, "platform", "linux")
    assert memory.max_rss_bytes() == 1024 * 1000
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.max_rss_bytes() == 1000


def test_no_module_reads_jsonl_or_memory_by_hand():
    """The duplicates this module replaced stay gone (report/data.py reads a run's own samples.jsonl
    tolerantly, a torn last line included: a different job)."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("evalkit/**/*.py"), *root.glob("trainers/**/*.py")]:
        if path.name in ("fileio.py", "memory.py") or "report" in path.parts:
            continue
        text = path.read_text()
        assert "ru_maxrss" not in text and "/proc/self/statm" not in text, path
        assert "def _read_jsonl" not in text and "def read_jsonl" not in text, path
