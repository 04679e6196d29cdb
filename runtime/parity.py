"""Parity between two Sessions on identical inputs (Polygraphy style: run each runner, then compare).

Inputs: a left-padded batch, one prefill and a few decode steps whose tokens are fixed up front, so
both runners see exactly the same ids while each feeds back its *own* KV cache. Compared per step:
logits (padded query positions dropped) and every present key/value (padded key positions dropped).
The comparison is a plain JSON-able dict with a pass/fail verdict against per-dtype tolerances.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from toolchain.core.iospec import present_name

from runtime.generate import KVStream
from runtime.sessions import Past, Session, host_past


@dataclass(frozen=True)
class ParityInputs:
    input_ids: np.ndarray  # (batch, prompt), left padded
    attention_mask: np.ndarray  # (batch, prompt)
    decode_ids: np.ndarray  # (batch, decode steps)
    seed: int = 0

    def describe(self) -> dict:
        return {"batch": int(self.input_ids.shape[0]), "prompt_length": int(self.input_ids.shape[1]),
                "left_padding": [int(p) for p in (self.attention_mask == 0).sum(1)],
                "decode_steps": int(self.decode_ids.shape[1]), "seed": self.seed}


@dataclass(frozen=True)
class Tolerances:
    logits_max_abs: float | None = None
    logits_top1_min: float | None = None
    logits_cosine_min: float | None = None
    require_finite: bool = True
    # top-1: a differing argmax whose reference logit is within this share of the row's largest
    # |reference logit| below the reference's top counts as a tie, not a disagreement
    logits_top1_tie: float | None = None


TOLERANCES = {
    "fp32": Tolerances(logits_max_abs=1e-4),
    # fp16 keeps 11 significant bits: two logits closer than its epsilon (2^-10) at the row's scale
    # cannot be ordered by an fp16 graph, and random-id prompts meet such near-ties often
    "fp16": Tolerances(logits_top1_min=0.99, logits_cosine_min=0.995, logits_top1_tie=float(np.finfo(np.float16).eps)),
}


@dataclass
class Step:
    name: str
    logits: np.ndarray
    present: Past
    query_mask: np.ndarray  # (batch, new tokens): which logits rows count
    key_mask: np.ndarray  # (batch, total): which cache positions count


@dataclass
class RunnerResult:
    runner: str
    steps: list[Step]
    seconds: float


def make_inputs(vocab_size: int, batch: int = 2, prompt: int = 12, pad: int = 3, decode_steps: int = 3,
                seed: int = 0) -> ParityInputs:
    """Random ids in [3, vocab) (clear of the usual special ids); row i>0 is left padded by `pad`."""
    rng = np.random.default_rng(seed)
    low = 3 if vocab_size > 8 else 0
    ids = rng.integers(low, vocab_size, (batch, prompt), dtype=np.int64)
    mask = np.ones((batch, prompt), dtype=np.int64)
    mask[1:, :pad] = 0
    ids[mask == 0] = 0
    decode = rng.integers(low, vocab_size, (batch, decode_steps), dtype=np.int64)
    return ParityInputs(ids, mask, decode, seed)


def run_steps(session: Session, inputs: ParityInputs) -> RunnerResult:
    """Prefill then one decode step per column of `decode_ids`, feeding back the session's own cache."""
    start = time.perf_counter()
    stream = KVStream.prompt(session, inputs.attention_mask)
    prompt = stream.mask.astype(bool)
    # the cache is copied out for the comparison only (a device session keeps running on its own)
    steps = [Step("prefill", stream.run(inputs.input_ids), host_past(stream.past), prompt, prompt)]
    for t in range(inputs.decode_ids.shape[1]):
        logits = stream.decode(inputs.decode_ids[:, t:t + 1])
        steps.append(Step(f"decode{t + 1}", logits, host_past(stream.past), np.ones((stream.batch, 1), bool),
                          stream.mask.astype(bool)))
    return RunnerResult(session.name, steps, time.perf_counter() - start)


def error_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """max/mean abs error, max relative error |a−b| / (|ref| + 1e-3·max|ref|) (the floor keeps
    near-zero reference values from dominating), cosine similarity, and finiteness."""
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    finite = bool(np.isfinite(cand).all())
    if ref.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "finite": finite, "count": 0}
    diff = np.abs(ref - cand)
    floor = 1e-3 * np.abs(ref).max() + 1e-12
    norms = np.linalg.norm(ref) * np.linalg.norm(cand)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float((diff / (np.abs(ref) + floor)).max()),
            "cosine": float(ref @ cand / norms) if norms > 0 else float(np.array_equal(ref, cand)),
            "finite": finite, "count": int(ref.size)}


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(share of rows with the same argmax, mean overlap of the top-k sets) over (rows, vocab)."""
    if reference.shape[0] == 0:
        return 1.0, 1.0
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    k = min(k, reference.shape[-1])
    ref_top = np.argpartition(-reference, k - 1, axis=-1)[:, :k]
    cand_top = np.argpartition(-candidate, k - 1, axis=-1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(ref_top.tolist(), cand_top.tolist())]
    return top1, float(np.mean(overlap))


def top1_agreement(reference: np.ndarray, candidate: np.ndarray, tie: float = 0.0) -> float:
    """Share of rows (rows, vocab) whose candidate argmax is the reference's, or within `tie` × the
    row's largest |reference logit| of the reference's top logit."""
    if reference.shape[0] == 0:
        return 1.0
    rows = np.arange(reference.shape[0])
    picked = reference[rows, candidate.argmax(-1)]
    margin = reference.max(-1) - picked
    return float((margin <= tie * np.abs(reference).max(-1)).mean())


def _kv_rows(array: np.ndarray, key_mask: np.ndarray) -> np.ndarray:
    """(batch, heads, total, dim) → (valid positions, heads, dim)."""
    return array.transpose(0, 2, 1, 3)[key_mask]


def compare(reference: RunnerResult, candidate: RunnerResult, tolerances: Tolerances, dtype: str = "fp32",
            inputs: ParityInputs | None = None) -> dict:
    """The JSON-able parity report of `candidate` against `reference`."""
    steps = []
    for ref, cand in zip(reference.steps, candidate.steps, strict=True):
        rows_ref, rows_cand = ref.logits[ref.query_mask], cand.logits[ref.query_mask]
        logits = error_metrics(rows_ref, rows_cand)
        logits["top1"], logits["top5"] = topk_agreement(rows_ref.astype(np.float32), rows_cand.astype(np.float32))
        if tolerances.logits_top1_tie is not None:
            logits["top1_with_ties"] = top1_agreement(rows_ref.astype(np.float32), rows_cand.astype(np.float32),
                                                      tolerances.logits_top1_tie)
        present = {}
        for i, ((rk, rv), (ck, cv)) in enumerate(zip(ref.present, cand.present, strict=True)):
            present[present_name(i, "key")] = error_metrics(_kv_rows(rk, ref.key_mask), _kv_rows(ck, ref.key_mask))
            present[present_name(i, "value")] = error_metrics(_kv_rows(rv, ref.key_mask), _kv_rows(cv, ref.key_mask))
        logits["reference_max_abs"] = float(np.abs(rows_ref).max()) if rows_ref.size else 0.0
        steps.append({"step": ref.name, "logits": logits, "present": present})

    summary = _summary(steps)
    summary["logits"]["reference_max_abs"] = max(s["logits"]["reference_max_abs"] for s in steps)
    checks = _checks(summary, tolerances)
    return {
        "reference": reference.runner, "candidate": candidate.runner, "dtype": dtype,
        "inputs": inputs.describe() if inputs is not None else None,
        "tolerances": asdict(tolerances),
        "summary": summary, "checks": checks, "passed": all(c["passed"] for c in checks),
        "steps": steps,
        "seconds": {"reference": round(reference.seconds, 4), "candidate": round(candidate.seconds, 4)},
    }


def check_parity(reference: Session, candidate: Session, dtype: str = "fp32",
                 inputs: ParityInputs | None = None, vocab_size: int | None = None) -> dict:
    """Run both sessions on the same inputs (batch 2, left padding, prefill + 3 decode steps) and compare."""
    if inputs is None:
        if vocab_size is None:
            raise ValueError("pass inputs or vocab_size")
        inputs = make_inputs(vocab_size)
    return compare(run_steps(reference, inputs), run_steps(candidate, inputs), TOLERANCES[dtype], dtype, inputs)


def _summary(steps: list[dict]) -> dict:
    def worst(entries: list[dict]) -> dict:
        return {"max_abs": max(e["max_abs"] for e in entries), "mean_abs": float(np.mean([e["mean_abs"] for e in entries])),
                "max_rel": max(e["max_rel"] for e in entries), "cosine": min(e["cosine"] for e in entries),
                "finite": all(e["finite"] for e in entries)}

    logits = [s["logits"] for s in steps]
    present = [m for s in steps for m in s["present"].values()]
    top = {key: min(e[key] for e in logits) for key in ("top1", "top5", "top1_with_ties") if key in logits[0]}
    return {"logits": {**worst(logits), **top},
            "present": worst(present) if present else None}


def _checks(summary: dict, tol: Tolerances) -> list[dict]:
    logits, checks = summary["logits"], []
    if tol.require_finite:
        finite = logits["finite"] and (summary["present"] is None or summary["present"]["finite"])
        checks.append({"check": "all outputs finite", "value": finite, "limit": True, "passed": finite})
    if tol.logits_max_abs is not None:
        # fp32 rounding grows with the logits' scale (tiny models: |logit| ~ 5, real ones ~ 30), so
        # the bar is relative to the largest reference logit, never looser than the absolute value
        limit = tol.logits_max_abs * max(1.0, logits.get("reference_max_abs", 1.0))
        checks.append({"check": "logits max abs (limit × max |reference logit|)", "value": logits["max_abs"],
                       "limit": limit, "passed": logits["max_abs"] <= limit})
    if tol.logits_top1_min is not None:
        top1 = logits.get("top1_with_ties", logits["top1"])
        checks.append({"check": "logits top-1 agreement", "value": top1, "limit": tol.logits_top1_min,
                       "passed": top1 >= tol.logits_top1_min, "strict": logits["top1"],
                       "ties_within": tol.logits_top1_tie})
    if tol.logits_cosine_min is not None:
        checks.append({"check": "logits cosine", "value": logits["cosine"], "limit": tol.logits_cosine_min,
                       "passed": logits["cosine"] >= tol.logits_cosine_min})
    return checks


def to_markdown(report: dict) -> str:
    """A human-readable rendering of `compare`'s dict."""
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [f"# Parity: {report['candidate']} vs {report['reference']} ({report['dtype']}) — {verdict}", ""]
    if report.get("inputs"):
        i = report["inputs"]
        lines += [f"Inputs: batch {i['batch']}, prompt {i['prompt_length']} tokens, left padding {i['left_padding']}, "
                  f"prefill + {i['decode_steps']} decode steps (seed {i['seed']}); padded positions ignored.", ""]
    lines += ["| check | value | limit | result |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['check']} | {_fmt(c['value'])} | {_fmt(c['limit'])} | {'pass' if c['passed'] else 'FAIL'} |")
    lines += ["", "| step | output | max abs | mean abs | max rel | cosine | top-1 | top-5 |",
              "|---|---|---|---|---|---|---|---|"]
    for step in report["steps"]:
        m = step["logits"]
        lines.append(f"| {step['step']} | logits | {_fmt(m['max_abs'])} | {_fmt(m['mean_abs'])} | {_fmt(m['max_rel'])} | "
                     f"{m['cosine']:.6f} | {m['top1']:.3f} | {m['top5']:.3f} |")
        if step["present"]:
            name, w = max(step["present"].items(), key=lambda kv: kv[1]["max_abs"])
            lines.append(f"| {step['step']} | worst KV ({name}) | {_fmt(w['max_abs'])} | {_fmt(w['mean_abs'])} | "
                         f"{_fmt(w['max_rel'])} | {w['cosine']:.6f} | | |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
