"""Task kind `judge`: generate each variant's answers, then have an LLM judge score them.

`mode: rubric` grades every variant's answer on a scale (or pass/fail) against a rubric file;
`mode: pairwise` compares each variant with the reference variant on the same case, asking in
both orders to cancel position bias. `samples: k` judge calls per item are aggregated (majority
or mean); flip rate, position-bias rate and agreement with human-labelled anchors are reported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.config.judge import JudgeConfig
from evalkit.config.task import JudgeTask
from evalkit.context import RunContext, progress_bar
from evalkit.errors import ConfigError
from evalkit.fileio import iter_jsonl, read_text
from evalkit.judge import verdicts as V
from evalkit.judge.client import SEED_POLICY, JudgeClient
from evalkit.judge.client import preflight as _endpoint_preflight
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.tasks.generation import task_cases
from evalkit.types import Score


@dataclass(frozen=True)
class PreparedJudge:
    """A judge task with its files read: the rubric's text and the human-labelled anchors."""

    spec: JudgeTask
    rubric: str
    anchors: tuple[dict[str, Any], ...] = ()

    @property
    def judge(self) -> JudgeConfig:
        return self.spec.judge

    @property
    def mode(self) -> str:
        return self.spec.mode  # "rubric" | "pairwise"; also the metric's name

    @property
    def scale(self) -> V.Scale:
        return V.PASS_FAIL if self.spec.scale == V.PASS_FAIL else self.spec.scale

    @property
    def samples(self) -> int:
        return self.spec.samples

    @property
    def aggregate(self) -> str:
        return self.spec.aggregate

    @property
    def schema(self) -> dict[str, Any]:
        return V.PAIRWISE_SCHEMA if self.mode == "pairwise" else V.rubric_schema(self.scale)


def prepare(task: JudgeTask) -> PreparedJudge:
    """Read the task's files (paths were resolved and checked when the suite loaded)."""
    rubric = read_text(task.rubric, "rubric file") if task.rubric is not None else V.DEFAULT_PAIRWISE_RUBRIC
    if not rubric.strip():
        raise ConfigError("the rubric file is empty: write the criteria the judge grades by", file=task.rubric)
    jt = PreparedJudge(task, rubric)
    if task.anchors is not None:
        jt = PreparedJudge(task, rubric, _load_anchors(task.anchors, jt))
    return jt


def _load_anchors(path: Path, jt: PreparedJudge) -> tuple[dict[str, Any], ...]:
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


def preflight(task: JudgeTask) -> None:
    """Before any model loads: files readable, key set, endpoint reachable, key accepted, model
    listed. Raises ConfigError (exit 4). Costs one GET /models and no completion."""
    prepare(task)
    try:
        _endpoint_preflight(task.judge)
    except ConfigError as e:
        if e.file is None and not e.path.startswith("tasks"):  # the endpoint's errors: the task's `judge:`
            e.path = f"{task.where()}.{e.path or 'judge'}"
            e.args = (e.format(),)
        raise


# ---------------------------------------------------------------- the run

Request = tuple[tuple[dict[str, str], ...], dict[str, Any], int]  # (messages, schema, sample)


@dataclass(frozen=True)
class _Item:
    """One thing to score: the requests to send and who it belongs to."""

    variant: str | None  # None: an anchor
    key: str  # case id or anchor id
    requests: tuple[Request, ...]
    split: int = 0  # pairwise: requests[:split] show the candidate first


def _requests(messages: Sequence[dict[str, str]], schema: dict[str, Any], k: int) -> tuple[Request, ...]:
    return tuple((tuple(messages), schema, s) for s in range(k))


def _item(jt: PreparedJudge, variant: str | None, key: str, conversation: str, output: str,
          reference_output: str | None, target: Any) -> _Item:
    if jt.mode == "rubric":
        msgs = V.rubric_messages(jt.rubric, conversation, output, jt.scale, target)
        return _Item(variant, key, _requests(msgs, jt.schema, jt.samples))
    first = V.pairwise_messages(jt.rubric, conversation, output, reference_output or "", target)
    second = V.pairwise_messages(jt.rubric, conversation, reference_output or "", output, target)
    return _Item(variant, key, _requests(first, jt.schema, jt.samples) + _requests(second, jt.schema, jt.samples),
                 split=jt.samples)


def _score(jt: PreparedJudge, item: _Item, verdicts: Sequence[V.Verdict]) -> Score:
    if jt.mode == "rubric":
        return V.score_rubric(verdicts, jt.scale, jt.aggregate)
    return V.score_pairwise(verdicts[:item.split], verdicts[item.split:], jt.aggregate)


def run(ctx: RunContext, task: JudgeTask) -> TaskResult:
    jt = prepare(task)
    cases = task_cases(task)
    names = [lv.name for lv in ctx.variants]
    ref = task.vs or ctx.suite.reference
    assert ref is not None  # set by validator
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
    bar = progress_bar(len(flat), f"judge {task.name}", ctx.progress, ctx.log)
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
        meta: dict[str, Any] = {"judge_calls": judge_calls, "judge_cached": sum(v.cached for v in verdicts)}
        if jt.mode == "pairwise":
            meta |= {"vs": ref, "reference_output": generated[ref][i][0].text}
        samples.append(SampleResult(task=task.name, variant=it.variant, case_id=it.key, prompt=out.prompt,
                                    output=out.text, target=cases[i].target, scores={jt.mode: score},
                                    cached=gen_cached and judge_calls == 0, meta=meta))

    extras = {"judge": {**_extras(jt, ref if jt.mode == "pairwise" else None, client, found, per_variant, anchor_pairs),
                        **_provenance(client, probe)}}
    j = extras["judge"]
    ctx.log(f"judge {task.name}: {j['calls']} calls, {j['cached']} cached, {j['invalid']} invalid items, "
            f"{j['retries']} retries")
    binary = jt.mode == "rubric" and jt.scale == V.PASS_FAIL and jt.aggregate == "majority"
    return TaskResult(samples=samples, binary={jt.mode: binary}, extras=extras)


def _extras(jt: PreparedJudge, ref: str | None, client: JudgeClient, found: Sequence[V.Verdict], per_variant: dict[str, list[Score]],
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
