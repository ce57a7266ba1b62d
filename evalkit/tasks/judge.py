"""Task kind `judge`: generate each variant's answers, then have an LLM judge score them.

`mode: rubric` grades every variant's answer on a scale (or pass/fail) against a rubric file;
`mode: pairwise` compares each variant with the reference variant on the same case, asking in
both orders to cancel position bias. `samples: k` judge calls per item are aggregated (majority
or mean); flip rate, position-bias rate and agreement with human-labelled anchors are reported.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from evalkit.config.suite import Suite, Task
from evalkit.context import RunContext, _progress
from evalkit.errors import ConfigError, NothingToEvaluate, did_you_mean
from evalkit.fileio import iter_jsonl
from evalkit.judge import verdicts as V
from evalkit.judge.client import RESPONSE_FORMATS, SEED_POLICY, JudgeClient, JudgeConfig
from evalkit.judge.client import preflight as _endpoint_preflight
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.tasks.generation import load_cases
from evalkit.types import Score

_NUM = {"type": "number"}
PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "kind: judge (generic keys data / limit / max_new_tokens are handled by the loader)",
    "required": ["judge"],
    "additionalProperties": False,
    "properties": {
        "judge": {
            "type": "object",
            "description": "an OpenAI-compatible endpoint; the API key is read from the variable named "
                           "by api_key_env, never written in the suite",
            "required": ["base_url", "model"],
            "additionalProperties": False,
            "properties": {
                "base_url": {"type": "string", "pattern": "^https?://"},
                "model": {"type": "string", "minLength": 1},
                "api_key_env": {"type": ["string", "null"], "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                "temperature": {**_NUM, "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1},
                "timeout": {**_NUM, "exclusiveMinimum": 0},
                "concurrency": {"type": "integer", "minimum": 1, "maximum": 64},
                "retries": {"type": "integer", "minimum": 0, "maximum": 20},
                "invalid_retries": {"type": "integer", "minimum": 0, "maximum": 10},
                "backoff": {**_NUM, "minimum": 0},
                "max_backoff": {**_NUM, "minimum": 0},
                "response_format": {"enum": list(RESPONSE_FORMATS)},
            },
        },
        "mode": {"enum": ["rubric", "pairwise"]},
        "rubric": {"type": "string", "description": "markdown file of criteria, relative to the suite file"},
        "scale": {"oneOf": [{"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2},
                            {"const": V.PASS_FAIL}]},
        "samples": {"type": "integer", "minimum": 1, "maximum": 25},
        "aggregate": {"enum": ["majority", "mean"]},
        "vs": {"type": "string", "description": "pairwise reference variant (default: the suite's reference)"},
        "anchors": {"type": "string", "description": "jsonl of human-labelled items, relative to the suite file"},
    },
}


@dataclass(frozen=True)
class JudgeTask:
    """A judge task's params, validated, with files resolved and read."""

    judge: JudgeConfig
    mode: str
    rubric: str
    scale: V.Scale
    samples: int
    aggregate: str
    vs: str | None
    anchors: tuple[dict[str, Any], ...]

    @property
    def metric(self) -> str:
        return self.mode  # "rubric" | "pairwise"

    @property
    def schema(self) -> dict[str, Any]:
        return V.PAIRWISE_SCHEMA if self.mode == "pairwise" else V.rubric_schema(self.scale)


def _resolve(path: str | Path, suite_dir: Path | None) -> Path:
    """Relative to the suite file first, then to the working directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or suite_dir is None:
        return p
    return suite_dir / p if (suite_dir / p).exists() or not p.exists() else p


def _validate(task: Task) -> dict[str, Any]:
    params = dict(task.params)
    if isinstance(params.get("judge"), Mapping) and "api_key" in params["judge"]:
        JudgeConfig.from_params(params["judge"])  # raises its own message, which never echoes the value
    error = next(iter(Draft202012Validator(PARAMS_SCHEMA).iter_errors(params)), None)
    if error is not None:
        message = error.message
        if error.validator == "additionalProperties":
            allowed = error.schema.get("properties", {})
            extra = sorted(set(error.instance) - set(allowed))[0]
            message = f"unknown key '{extra}'{did_you_mean(extra, allowed)}"
        raise ConfigError(message, line=task.line, path=task.where(*error.absolute_path))
    return params


def parse(task: Task, suite_dir: Path | None = None) -> JudgeTask:
    params = _validate(task)
    mode = params.get("mode", "rubric")
    scale = params.get("scale", [1, 5])
    scale = V.PASS_FAIL if scale == V.PASS_FAIL else (float(scale[0]), float(scale[1]))
    if scale != V.PASS_FAIL and scale[0] >= scale[1]:
        raise ConfigError(f"scale must be [min, max] with min < max, got {params['scale']}",
                          line=task.line, path=task.where("scale"))
    if "rubric" in params:
        path = _resolve(params["rubric"], suite_dir)
        if not path.is_file():
            raise ConfigError(f"rubric file not found: {path}", line=task.line, path=task.where("rubric"))
        rubric = path.read_text()
    elif mode == "pairwise":
        rubric = V.DEFAULT_PAIRWISE_RUBRIC
    else:
        raise ConfigError("a rubric judge task needs `rubric: FILE`", line=task.line, path=task.where())
    jt = JudgeTask(JudgeConfig.from_params(params["judge"]), mode, rubric, scale, params.get("samples", 1),
                   params.get("aggregate", "majority"), params.get("vs"), ())
    if "anchors" in params:
        jt = JudgeTask(**{**jt.__dict__, "anchors": _load_anchors(_resolve(params["anchors"], suite_dir), jt)})
    return jt


def _load_anchors(path: Path, jt: JudgeTask) -> tuple[dict[str, Any], ...]:
    need = ("output_a", "output_b") if jt.mode == "pairwise" else ("output",)
    out = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or not (row.get("messages") or row.get("prompt")):
            raise ConfigError("each row needs 'messages' or 'prompt'", file=path, line=n)
        missing = [k for k in (*need, "label") if k not in row]
        if missing:
            raise ConfigError(f"anchor row lacks {', '.join(missing)}", file=path, line=n)
        try:
            human = V.human_label(row["label"], jt.mode, jt.scale)
        except ValueError as e:
            raise ConfigError(str(e), file=path, line=n) from None
        out.append({**row, "id": str(row.get("id", f"anchor-{n}")), "human": human})
    return tuple(out)


def preflight(task: Task, suite: Suite | Path | None = None) -> None:
    """Before any model loads: params valid, files present (given the suite or its folder), key
    set, endpoint reachable, key accepted, model listed. Raises ConfigError (exit 4). Costs one
    GET /models and no completion."""
    suite_dir = suite.dir if isinstance(suite, Suite) else suite
    try:
        jt = parse(task, suite_dir) if suite_dir is not None else None
        _endpoint_preflight(jt.judge if jt else JudgeConfig.from_params(_validate(task)["judge"]))
    except ConfigError as e:
        if e.file is None and not e.path.startswith("tasks"):  # the endpoint's errors: the task's `judge:`
            e.path = f"{task.where()}.{e.path or 'judge'}"
            e.args = (e.format(),)
        raise


# ---------------------------------------------------------------- the run

@dataclass(frozen=True)
class _Item:
    """One thing to score: the requests to send and who it belongs to."""

    variant: str | None  # None: an anchor
    key: str  # case id or anchor id
    requests: tuple[tuple[tuple[dict[str, str], ...], dict[str, Any], int], ...]
    split: int = 0  # pairwise: requests[:split] show the candidate first


def _requests(messages: Sequence[dict[str, str]], schema: dict[str, Any], k: int):
    return tuple((tuple(messages), schema, s) for s in range(k))


def _item(jt: JudgeTask, variant: str | None, key: str, conversation: str, output: str,
          reference_output: str | None, target: Any) -> _Item:
    if jt.mode == "rubric":
        msgs = V.rubric_messages(jt.rubric, conversation, output, jt.scale, target)
        return _Item(variant, key, _requests(msgs, jt.schema, jt.samples))
    first = V.pairwise_messages(jt.rubric, conversation, output, reference_output or "", target)
    second = V.pairwise_messages(jt.rubric, conversation, reference_output or "", output, target)
    return _Item(variant, key, _requests(first, jt.schema, jt.samples) + _requests(second, jt.schema, jt.samples),
                 split=jt.samples)


def _score(jt: JudgeTask, item: _Item, verdicts: Sequence[V.Verdict]) -> Score:
    if jt.mode == "rubric":
        return V.score_rubric(verdicts, jt.scale, jt.aggregate)
    return V.score_pairwise(verdicts[:item.split], verdicts[item.split:], jt.aggregate)


def run(ctx: RunContext, task: Task) -> TaskResult:
    jt = parse(task, ctx.suite.dir)
    if task.data is None:
        raise ConfigError("a judge task needs `data: FILE` (jsonl of prompts)", line=task.line,
                          path=task.where())
    cases = load_cases(_resolve(task.data, ctx.suite.dir), task.limit)
    if not cases:
        raise NothingToEvaluate(f"task '{task.name}': no cases in {task.data}")
    names = [lv.name for lv in ctx.variants]
    ref = jt.vs or ctx.suite.reference
    if jt.mode == "pairwise" and ref not in names:
        raise ConfigError(f"pairwise reference variant '{ref}' is not in this run (variants: {', '.join(names)})",
                          line=task.line, path=task.where("vs"))
    generated = {lv.name: ctx.generate(lv, cases, task.generation, desc=task.name) for lv in ctx.variants}
    scored = [n for n in names if jt.mode == "rubric" or n != ref]

    items = [_item(jt, name, case.id, V.transcript(case.messages, case.prompt), generated[name][i][0].text,
                   generated[ref][i][0].text if jt.mode == "pairwise" else None, case.target)
             for name in scored for i, case in enumerate(cases)]
    items += [_item(jt, None, a["id"], V.transcript(a.get("messages"), a.get("prompt")),
                    a["output_a"] if jt.mode == "pairwise" else a["output"], a.get("output_b"), a.get("target"))
              for a in jt.anchors]

    client = JudgeClient(jt.judge, ctx.cache, log=ctx.log)  # its identity: one GET /models
    flat = [r for it in items for r in it.requests]
    bar = _progress(len(flat), f"judge {task.name}", ctx.progress)
    try:
        found = client.judge_many(flat, on_done=lambda: bar.update(1))
    finally:
        bar.close()
    probe = client.probe_seeds()

    human = {a["id"]: a["human"] for a in jt.anchors}
    index = {c.id: i for i, c in enumerate(cases)}
    samples: list[SampleResult] = []
    per_variant: dict[str, list[Score]] = {n: [] for n in scored}
    anchor_pairs: list[tuple[Any, Any, str]] = []
    pos = 0
    for it in items:
        verdicts = found[pos:pos + len(it.requests)]
        pos += len(it.requests)
        score = _score(jt, it, verdicts)
        if it.variant is None:
            anchor_pairs.append((V.judge_label(score, jt.mode, jt.scale), human[it.key], it.key))
            continue
        i = index[it.key]
        out, gen_cached = generated[it.variant][i]
        per_variant[it.variant].append(score)
        judge_calls = sum(v.calls for v in verdicts)
        meta = {"judge_calls": judge_calls, "judge_cached": sum(v.cached for v in verdicts)}
        if jt.mode == "pairwise":
            meta |= {"vs": ref, "reference_output": generated[ref][i][0].text}
        samples.append(SampleResult(task=task.name, variant=it.variant, case_id=it.key, prompt=out.prompt,
                                    output=out.text, target=cases[i].target, scores={jt.metric: score},
                                    cached=gen_cached and judge_calls == 0, meta=meta))

    extras = {"judge": {**_extras(jt, ref if jt.mode == "pairwise" else None, client, found, per_variant, anchor_pairs),
                        **_provenance(client, probe)}}
    j = extras["judge"]
    ctx.log(f"judge {task.name}: {j['calls']} calls, {j['cached']} cached, {j['invalid']} invalid items, "
            f"{j['retries']} retries")
    binary = jt.mode == "rubric" and jt.scale == V.PASS_FAIL and jt.aggregate == "majority"
    return TaskResult(samples=samples, binary={jt.metric: binary}, extras=extras)


def _extras(jt: JudgeTask, ref: str | None, client: JudgeClient, found: Sequence[V.Verdict], per_variant: dict[str, list[Score]],
            anchor_pairs: list[tuple[Any, Any, str]]) -> dict[str, Any]:
    def valid(name: str) -> list[Score]:
        return [s for s in per_variant[name] if s.valid]

    anchors = None
    if anchor_pairs:
        judge, human, ids = zip(*anchor_pairs)
        anchors = {"accuracy": V.accuracy(judge, human), "kappa": V.cohens_kappa(judge, human), "n": len(ids),
                   "n_invalid": sum(j == "invalid" for j in judge),
                   "items": [{"id": i, "judge": j, "human": h} for j, h, i in anchor_pairs]}
    return {
        "model": jt.judge.model, "base_url": jt.judge.base_url, "api_key_env": jt.judge.api_key_env,
        "mode": jt.mode, "scale": None if jt.mode == "pairwise" else jt.scale if jt.scale == V.PASS_FAIL
        else list(jt.scale), "samples": jt.samples, "aggregate": jt.aggregate, "vs": ref,
        "temperature": jt.judge.temperature, "max_tokens": jt.judge.max_tokens,
        **client.stats,  # calls (completions made), cached, requests (HTTP attempts), retries, errors, probe_calls
        "invalid": sum(not s.valid for scores in per_variant.values() for s in scores),
        "invalid_verdicts": sum(not v.valid for v in found),
        "flip_rate": {n: V.rate([s.meta["flip"] for s in valid(n)]) if jt.samples > 1 else None
                      for n in per_variant},
        "position_bias_rate": ({n: V.rate([s.meta["order_disagree"] for s in valid(n)]) for n in per_variant}
                               if jt.mode == "pairwise" else {}),
        "anchors": anchors,
    }


def _provenance(client: JudgeClient, probe: str) -> dict[str, Any]:
    """Which endpoint answered (and whether its weights can be told apart), and how it was seeded."""
    return {"endpoint": client.identity, "endpoint_verified": "fingerprint" in client.identity,
            "seeds": {"policy": SEED_POLICY, "probe": probe,
                      "honoured": {"honoured": True, "ignored": False}.get(probe)}}
