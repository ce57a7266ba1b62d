"""`kind: drift`: KL(reference || variant), top-1 agreement and perplexity ratio on neutral passages,
with the reference's distributions cached as top-k plus a tail bucket."""
from __future__ import annotations

import json

import pytest
from helpers import make_adapter, write_jsonl, write_suite

from evalkit.errors import ExitCode
from evalkit.tasks import drift


def _full_kl(p_lp, q_lp) -> float:
    return float((p_lp[:-1].double().exp() * (p_lp[:-1].double() - q_lp[:-1].double())).sum(-1).mean())


def test_compact_reference_is_exact_for_a_small_vocabulary_and_a_lower_bound_otherwise():
    import torch

    torch.manual_seed(0)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    p = torch.log_softmax(torch.randn(len(tokens), 50) * 3, -1)
    q = torch.log_softmax(p + torch.randn(len(tokens), 50), -1)
    full = _full_kl(p, q)
    whole = drift.compare(drift.Reference.of(p, tokens, top_k=50), q, tokens)
    assert whole["kl"] == pytest.approx(full, rel=1e-9)  # k = vocabulary: the full KL
    bounds = [drift.compare(drift.Reference.of(p, tokens, top_k=k), q, tokens)["kl"] for k in (1, 5, 20, 49)]
    assert all(b <= full + 1e-12 for b in bounds) and bounds == sorted(bounds)  # more cells, tighter bound
    assert bounds[-1] > 0.9 * full
    # agreement and perplexity ratio from first principles
    assert whole["top1_agreement"] == pytest.approx(float((p[:-1].argmax(-1) == q[:-1].argmax(-1)).double().mean()))
    nll = lambda lp: -float(lp[:-1].gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).mean())  # noqa: E731
    assert whole["ppl_ratio"] == pytest.approx(torch.exp(torch.tensor(nll(q) - nll(p))).item(), rel=1e-6)
    # the reference as cached (2-byte ids, float32) answers exactly as the fresh one
    ref = drift.Reference.of(p, tokens, top_k=7)
    again = drift.Reference.from_json(json.loads(json.dumps(ref.to_json())))
    assert drift.compare(again, q, tokens) == drift.compare(ref, q, tokens)
    assert drift.compare(ref, p, tokens) == {"kl": 0.0, "top1_agreement": 1.0, "ppl_ratio": 1.0}


def test_passages_from_a_data_file_with_located_errors(tmp_path):
    from evalkit.config.canary import DriftTask
    from evalkit.errors import ConfigError

    data = write_jsonl(tmp_path / "p.jsonl", [{"text": "one two three"}, {"id": "b", "text": "four five"}])
    task = DriftTask.model_validate({"name": "d", "kind": "drift", "data": str(data)})
    found, source = drift.passages(task, 0)
    assert [p.id for p in found] == ["p:1", "b"] and source == str(data)
    stems, source = drift.passages(DriftTask.model_validate({"name": "d", "kind": "drift", "limit": 5}), 0)
    assert len(stems) == 5 and source.startswith("MMLU question stems")
    more, _ = drift.passages(DriftTask.model_validate({"name": "d", "kind": "drift", "limit": 9}), 0)
    assert [p.id for p in more[:5]] == [p.id for p in stems]  # seeded: a larger slice extends a smaller one
    write_jsonl(data, [{"text": "fine"}, {"txt": "typo"}])
    with pytest.raises(ConfigError, match=r"p.jsonl:2.*needs a non-empty `text`"):
        drift.passages(task, 0)


def test_confidence_on_an_unbounded_drift_metric_is_refused_where_it_is_written(tmp_path):
    """No bound on the mean of unbounded heavy-tailed values holds its level (bench_verdicts shows
    evalkit's passing 11-18% at 95% on lognormal values): the suite says so, at the gate's line."""
    from evalkit.config import load_suite
    from evalkit.errors import ConfigError

    doc = {"name": "d", "base": {"path": str(tmp_path)}, "variants": [{"name": "base"}, {"name": "a", "adapter": str(tmp_path)}],
           "tasks": [{"name": "drift", "kind": "drift"}],
           "gates": [{"metric": "drift.top1_agreement", "min": 0.9, "confidence": 0.95},
                     {"metric": "drift.kl", "max": 0.05, "confidence": 0.95}]}
    with pytest.raises(ConfigError, match=r"suite.yml:\d+ gates\[1\].confidence: `confidence:` cannot hold its "
                                          r"level on drift.kl") as e:
        load_suite(write_suite(tmp_path / "suite.yml", doc))
    assert "point estimate" in (e.value.hint or "")
    doc["gates"][1].pop("confidence")
    assert load_suite(write_suite(tmp_path / "suite.yml", doc)).gates[1].confidence is None


@pytest.mark.e2e
def test_drift_gate_separates_a_null_adapter_from_a_damaging_one(tmp_path, embedded_model_dir):
    """Point 3 on the embedded model: LoRA B scaled by 1e-3 passes `max: 0.001` on mean KL, large
    random A and B fail it; the rerun answers from the cache and loads no model."""
    from evalkit.runner import evaluate

    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    null = make_adapter(embedded_model_dir, tmp_path / "null", seed=1, scale_b=1e-3, r=8, target_modules=modules)
    wreck = make_adapter(embedded_model_dir, tmp_path / "wreck", seed=2, scale_b=40.0, r=8, target_modules=modules)
    suite = write_suite(tmp_path / "suite.yml", {
        "name": "drift", "base": {"path": str(embedded_model_dir)},
        "variants": [{"name": "base"}, {"name": "null", "adapter": str(null)}, {"name": "wreck", "adapter": str(wreck)}],
        "tasks": [{"name": "drift", "kind": "drift", "limit": 16, "max_tokens": 48}],
        "gates": [{"metric": "drift.kl", "max": 0.001}, {"metric": "drift.top1_agreement", "min": 0.9}]})
    logs: list[str] = []
    run = evaluate(suite, out=tmp_path / "run", cache_path=tmp_path / "c.sqlite", progress=False, log=logs.append)
    gates = {(g["metric"], g["variant"]): g for g in run.results["gates"]}
    assert gates[("drift.kl", "null")]["passed"] and gates[("drift.top1_agreement", "null")]["passed"]
    assert not gates[("drift.kl", "wreck")]["passed"] and not gates[("drift.top1_agreement", "wreck")]["passed"]
    assert run.exit_code == ExitCode.GATE_FAILED
    values = {(m["metric"], m["variant"]): m["value"] for m in run.results["metrics"]}
    assert values[("kl", "null")] < 1e-5 < 1.0 < values[("kl", "wreck")]
    assert values[("kl", "base")] == 0.0 and values[("ppl_ratio", "wreck")] > 10
    assert run.results["tasks"][0]["extras"]["vs"] == {"base": "itself", "null": "its base", "wreck": "its base"}
    assert run.results["tasks"][0]["extras"]["passages"] == 16

    again = evaluate(suite, out=tmp_path / "again", cache_path=tmp_path / "c.sqlite", progress=False,
                     log=lambda _: None)
    assert again.results["environment"]["device"] == "none"
    assert {(m["metric"], m["variant"]): m["value"] for m in again.results["metrics"]} == values
