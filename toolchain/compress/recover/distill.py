"""The teacher (the dense model the student was compressed from, on the canonical model) and the losses."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from toolchain.core.errors import ArtifactError


def teacher_source(model_dir: Path) -> tuple[str, bool]:
    """(the dense source model, whether its head stays tied), as the compress stage recorded them."""
    report_path = model_dir / "compression_report.json"
    options = json.loads(report_path.read_text()).get("options", {}) if report_path.is_file() else {}
    source = options.get("model") or json.loads((model_dir / "config.json").read_text()).get("source_model")
    if not source:
        raise ArtifactError(f"{model_dir} names no source model (compression_report.json options.model or "
                            "config.json source_model), so there is no teacher; use --recover lora")
    return source, options.get("tie", "slice") != "untie"


def load_teacher(model_dir: Path, device: str):
    """The dense source, mapped onto the canonical model the way compress mapped it; loaded once, frozen."""
    from toolchain.data.sources import load_hf_weights, resolve_model
    from toolchain.model.adapters import to_canonical
    from toolchain.model.modeling import SlicedForCausalLM

    source, keep_tie = teacher_source(model_dir)
    hf_model = load_hf_weights(resolve_model(source), torch.float32)
    teacher = hf_model if isinstance(hf_model, SlicedForCausalLM) else to_canonical(
        hf_model, source_model=source, keep_tie=keep_tie)
    del hf_model
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), source


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token at temperature 1, averaged over tokens."""
    student = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def log_rest(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `indices`, from the masked log-probs (no 1 - sum cancellation)."""
    return logprobs.scatter(-1, indices, float("-inf")).logsumexp(dim=-1)


def kl_to_top_k(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                rest: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token at T = 1 over the teacher's top-k tokens plus one bucket for the
    remaining mass: the KL between the two distributions coarse-grained that way, so it never exceeds
    the full KL and equals it when k covers the vocabulary."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    picked = student.gather(-1, indices)
    student_rest = log_rest(student, indices)
    top = (values.exp() * (values - picked)).sum(-1)
    has_rest = torch.isfinite(rest)  # -inf: k covered the vocabulary, the bucket is empty
    bucket = torch.where(has_rest, rest.exp() * (rest - torch.where(has_rest, student_rest, 0.0)), 0.0)
    return (top + bucket).sum() / top.numel()
