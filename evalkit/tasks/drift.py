"""Task kind `drift`: forgetting as it starts, before any benchmark answer flips.

On neutral passages (MMLU question stems shipped offline, or the user's `data:`), each variant's
next-token distributions are compared with the reference's (`vs:`, default the suite's
reference) at every position. Per passage: the mean KL(reference || variant) in nats per token,
the share of positions whose top-1 token agrees, and the perplexity ratio variant / reference on
the passage's own tokens. Passages are the cases, so intervals and paired comparisons are over
passages; `max:` on `kl` and `min:` on `top1_agreement` are the gates.

The reference's distributions are computed once per passage and cached compactly: the top-k
log-probabilities of each position and the rest of the vocabulary as ONE bucket (its total
mass). KL is computed between those (k+1)-cell distributions: a lower bound of the full-vocabulary
KL (merging cells never increases KL), exact when the vocabulary has at most k tokens; the
tail bucket keeps every bit of mass the top k miss. Each variant's per-passage result is cached
too, so a rerun loads no model. Distributions need every logit: in-process (`hf`) variants only.
"""
from __future__ import annotations

import base64
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evalkit.backends.base import InProcess
from evalkit.cache import Deliver, cached, drift_key, drift_summary_key
from evalkit.config.canary import DriftTask
from evalkit.errors import ConfigError
from evalkit.fileio import iter_jsonl
from evalkit.tasks.base import SampleResult, TaskResult
from evalkit.types import Score, stable_hash

if TYPE_CHECKING:
    from evalkit.context import RunContext, RunVariant

DEFAULT_PASSAGES = 64
MIN_WORDS = 8  # MMLU stems shorter than this are mostly "Which of the following ...?" fragments
METRICS = ("kl", "top1_agreement", "ppl_ratio")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str


def passages(task: DriftTask, seed: int) -> tuple[list[Passage], str]:
    """The passages scored, and where they came from."""
    if task.data is not None:
        out = []
        for line, row in iter_jsonl(task.data):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ConfigError("each row needs a non-empty `text`", file=task.data, line=line)
            out.append(Passage(str(row.get("id", f"{task.data.stem}:{line}")), row["text"]))
            if task.limit is not None and len(out) >= task.limit:
                break
        if len({p.id for p in out}) != len(out):
            raise ConfigError("duplicate passage id", file=task.data)
        return out, str(task.data)
    from evalkit.tasks.mmlu_data import load_questions, seeded_order

    loaded = load_questions()
    stems = [Passage(q.id, q.question.strip()) for q in loaded.questions if len(q.question.split()) >= MIN_WORDS]
    chosen = seeded_order(stems, f"evalkit-drift:{seed}")[:task.limit or DEFAULT_PASSAGES]
    return chosen, f"MMLU question stems ({loaded.source})"


# ---------------------------------------------------------------- the reference, compactly

def _pack(tensor: Any) -> str:
    return base64.b64encode(tensor.contiguous().numpy().tobytes()).decode()


def _unpack(text: str, dtype: Any, shape: tuple[int, ...]) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape).copy())


@dataclass(frozen=True)
class Reference:
    """A passage's reference distributions at its T-1 predicting positions: top-k log-probabilities
    and token ids (descending), the log of the mass outside them, and the mean NLL of the passage."""

    logprobs: Any  # [T-1, k] float32
    ids: Any  # [T-1, k] int64
    log_tail: Any  # [T-1] float32 (-inf when the top k hold everything)
    nll: float

    @classmethod
    def of(cls, lp: Any, tokens: Sequence[int], top_k: int) -> Reference:
        """From full log-probabilities [T, vocab] of the passage `tokens`."""
        rows = lp[:-1]
        ids = rows.topk(min(top_k, rows.shape[-1]), dim=-1).indices
        return cls(*_reduce(rows, ids, tokens))

    def to_json(self) -> dict[str, Any]:
        small = int(self.ids.max()) < 2 ** 16  # vocabularies under 65,536 tokens store 2-byte ids
        return {"shape": list(self.logprobs.shape), "wide": not small, "nll": self.nll,
                "logprobs": _pack(self.logprobs), "ids": _pack(self.ids.to(_id_dtype(not small))),
                "log_tail": _pack(self.log_tail)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Reference:
        import numpy as np
        import torch

        shape = tuple(d["shape"])
        ids = _unpack(d["ids"], np.int32 if d["wide"] else np.uint16, shape)
        return cls(_unpack(d["logprobs"], np.float32, shape), ids.to(torch.int64),
                   _unpack(d["log_tail"], np.float32, shape[:1]), float(d["nll"]))


def _id_dtype(wide: bool) -> Any:
    import torch

    return torch.int32 if wide else torch.uint16


def _reduce(rows: Any, ids: Any, tokens: Sequence[int]) -> tuple[Any, Any, Any, float]:
    """What a passage keeps of its distributions [T-1, vocab] on the cells `ids` [T-1, k]: their
    log-probabilities, the ids, the log of the mass outside them, and the passage's mean NLL. The
    reference and every variant go through this one reduction (same ops, same dtype), so a variant
    identical to its reference compares as exactly equal."""
    import torch

    tail = rows.scatter(-1, ids, float("-inf")).logsumexp(-1)
    nll = -rows.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).mean()
    return rows.gather(-1, ids), ids, tail, float(nll)


def compare(ref: Reference, lp: Any, tokens: Sequence[int]) -> dict[str, float]:
    """One passage: mean KL(reference || variant) over positions (on the reference's top-k cells
    plus the tail bucket), top-1 agreement, and the perplexity ratio variant / reference (a variant
    identical to its reference scores 0, 100%, x1 exactly: see `_reduce`)."""
    import torch

    rows = lp[:-1]
    q_log, _, q_tail, nll = _reduce(rows, ref.ids, tokens)
    q_log, q_tail = q_log.double(), q_tail.double()
    p_log, p_tail = ref.logprobs.double(), ref.log_tail.double()
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    kl = kl + torch.where(torch.isfinite(p_tail), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(kl))
    agree = (rows.argmax(-1) == ref.ids[:, 0]).double().mean()
    return {"kl": float(kl.clamp(min=0).mean()), "top1_agreement": float(agree),
            "ppl_ratio": math.exp(nll - ref.nll)}


# ---------------------------------------------------------------- the task kind

@dataclass(frozen=True)
class Against:
    """What a variant's drift is measured from: a variant of the run, or the base its adapter sits
    on (same precision, adapter off); `key` is the reference's content address."""

    label: str
    key: str
    variant: str  # whose model runs the reference forward
    adapters_off: bool


def against(ctx: RunContext, task: DriftTask, lv: RunVariant) -> Against:
    if task.vs is not None:
        ref = ctx.variant(task.vs)
        return Against(ref.name, ref.fingerprint, ref.name, False)
    if lv.info is None:
        return Against("itself", lv.fingerprint, lv.name, False)
    quantize = lv.variant.quantize
    key = stable_hash({"drift-reference": "the base, adapters off", "base": ctx.base.sha256, "quantize": quantize})
    return Against("its base" + (f" ({quantize})" if quantize else ""), key, lv.name, True)


def run(ctx: RunContext, task: DriftTask) -> TaskResult:
    seed = ctx.suite.seed if task.seed is None else task.seed
    found, source = passages(task, seed)
    tokens = [list(ctx.tokenizer.encode(p.text))[:task.max_tokens] for p in found]
    keep = [i for i, t in enumerate(tokens) if len(t) >= 2]  # one token predicts nothing
    found, tokens = [found[i] for i in keep], [tokens[i] for i in keep]
    if not found:
        raise ConfigError("no passage has two tokens or more", path=task.where("data"))
    models = {lv.name: _in_process(task, lv) for lv in ctx.variants}
    refs = {lv.name: against(ctx, task, lv) for lv in ctx.variants}
    summaries = {lv.name: _summaries(ctx, task, lv, refs[lv.name], models, tokens) for lv in ctx.variants}
    samples = [SampleResult(task=task.name, variant=lv.name, case_id=p.id, prompt=p.text, output="", target=None,
                            scores={m: Score(values[m]) for m in METRICS}, cached=cached, meta={"tokens": len(ids)})
               for lv in ctx.variants for p, ids, (values, cached) in zip(found, tokens, summaries[lv.name])]
    return TaskResult(samples=samples, binary=dict.fromkeys(METRICS, False), extras={
        "vs": {v: r.label for v, r in refs.items()}, "source": source, "passages": len(found), "top_k": task.top_k,
        "max_tokens": task.max_tokens,
        "kl": f"a lower bound: the reference's top-{task.top_k} tokens per position plus one bucket for the rest"})


def _in_process(task: DriftTask, lv: RunVariant) -> InProcess:
    """The variant's backend, which must give every logit of the next-token distributions."""
    backend = lv.backend
    if not isinstance(backend, InProcess):
        raise ConfigError(f"drift needs every logit of the next-token distributions; variant '{lv.name}' runs on "
                          f"'{backend.record(lv.name).engine}', which gives top log-probabilities only",
                          path=task.where("kind"), hint="run the variants of a drift task on `backend: {kind: hf}`")
    return backend


def _summaries(ctx: RunContext, task: DriftTask, lv: RunVariant, ref: Against, models: dict[str, InProcess],
               tokens: list[list[int]]) -> list[tuple[dict[str, float], bool]]:
    """(kl, top1_agreement, ppl_ratio) per passage, cached per (variant, reference, passage)."""
    if ref.key == lv.fingerprint:
        return [({"kl": 0.0, "top1_agreement": 1.0, "ppl_ratio": 1.0}, True) for _ in tokens]  # itself
    keys = [drift_summary_key(lv.fingerprint, ref.key, t, task.top_k) for t in tokens]

    def compute(todo: list[int], deliver: Deliver[dict[str, float]]) -> None:
        references = _references(ctx, task, ref, models[ref.variant], [tokens[i] for i in todo])

        def on_each(j: int, lp: Any) -> None:
            deliver({todo[j]: compare(references[j], lp, tokens[todo[j]])})

        t0 = time.perf_counter()
        models[lv.name].next_token_logprobs(lv.name, [tokens[i] for i in todo], on_each, batch_size=task.batch_size)
        ctx.count(lv.name, seconds=time.perf_counter() - t0)

    return cached(ctx.cache, keys, compute)


def _references(ctx: RunContext, task: DriftTask, ref: Against, model: InProcess,
                tokens: list[list[int]]) -> list[Reference]:
    """The reference's compact distributions for these passages: from the cache, else computed
    (batched forwards on `model`) and cached."""
    keys = [drift_key(ref.key, t, task.top_k) for t in tokens]

    def compute(todo: list[int], deliver: Deliver[Reference]) -> None:
        def on_each(j: int, lp: Any) -> None:
            deliver({todo[j]: Reference.of(lp, tokens[todo[j]], task.top_k)})

        model.next_token_logprobs(ref.variant, [tokens[i] for i in todo], on_each, batch_size=task.batch_size,
                                  adapters_off=ref.adapters_off)

    found = cached(ctx.cache, keys, compute, count=False, decode=Reference.from_json, encode=Reference.to_json)
    return [r for r, _ in found]
