"""recover_to_dir: a compressed canonical model dir in, a recovered plain canonical model dir out.

Cheap checks come first (options, text sources, the held-out/training overlap, LoRA target names),
then the student and the teacher are loaded once. Training state lives in a hidden sibling of the
output (`.<name>.recover-state`), so a killed run resumes from its last checkpoint; the output dir
appears only when complete, and the state is removed then.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolchain.compress.options import RecoverOptions, resolve_device
from toolchain.compress.recover import checkpoint, data, defaults, lora, loop, report, teacher
from toolchain.compress.recover.distill import load_teacher
from toolchain.core.errors import ArtifactError, OutputPathError, ToolchainError
from toolchain.core.fileio import atomic_dir, sha256_file

COPIED = ("compression_report.json",)  # the compressed model's own record travels with it


@dataclass
class RecoverResult:
    out_dir: Path
    report: dict


def state_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.recover-state"


def _input_hashes(model_dir: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
            if p.is_file() and (p.suffix in (".json", ".safetensors") and p.name not in (report.REPORT,))}


def _run_key(options: RecoverOptions, device: str, model_dir: Path) -> str:
    payload = {"options": asdict(options), "device": device, "inputs": _input_hashes(model_dir)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer(model_dir: Path):
    from toolchain.data.sources import load_tokenizer

    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"{model_dir} has no config.json; pass a model dir written by `toolchain slice` or a "
                            "build's sliced/")
    return load_tokenizer(model_dir)


def _load_student(model_dir: Path):
    from toolchain.data.sources import load_hf_weights, resolve_model
    from toolchain.model.adapters import to_canonical
    from toolchain.model.modeling import SlicedForCausalLM

    model = load_hf_weights(resolve_model(str(model_dir)), torch.float32)
    if not isinstance(model, SlicedForCausalLM):  # a dense HF checkpoint: recover it on the canonical model
        model = to_canonical(model, source_model=str(model_dir))
    return model


def _teacher(model_dir: Path, student, o: RecoverOptions, device: str, train, state_dir: Path, key: str, progress):
    """The loss's view of the teacher ((ids, step, micro) → logits or top-k targets), its record, and the
    free memory its placement saw (machine state: reported under timing). Loaded once on the CPU, then
    placed where it fits (see teacher.py)."""
    model, source = load_teacher(model_dir, "cpu")
    where = teacher.place(o.recover_teacher, device, student, model, o.recover == "full-distill", o.recover_batch,
                          o.recover_seqlen)
    record = {"source": source} | {k: v for k, v in asdict(where).items() if k != "free_bytes"}
    if where.mode == "resident":
        resident = model.to(device)
        return (lambda ids, step, micro: resident(input_ids=ids, use_cache=False).logits), record, where.free_bytes
    checkpoint.forget_other_run(state_dir, key)  # a stale run's state must not take the cache with it later
    cache = teacher.build_cache(model, train, o.recover_steps, o.recover_grad_accum, o.recover_batch, o.recover_topk,
                                where.teacher_device, state_dir, key, progress)
    del model  # freed before the student trains: the point of the cache
    record |= {"topk": o.recover_topk, "cache_bytes": teacher.cache_bytes(cache)}
    return (lambda ids, step, micro: cache[step, micro]), record, where.free_bytes


def recover_to_dir(model_dir: str | Path, out_dir: str | Path, options: RecoverOptions, device: str = "auto",
                   overwrite: bool = False, progress=None) -> RecoverResult:
    options.validate()
    model_dir, out_dir = Path(model_dir).expanduser(), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputPathError(f"--out {out_dir} already exists; choose a new directory or remove it")
    run = defaults.resolve(options, resolve_device(device))
    o, device = run.options, run.device
    state_dir = state_dir_for(out_dir)
    try:
        return _recover(model_dir, out_dir, o, device, state_dir, overwrite, progress)
    except ToolchainError:
        checkpoint.discard(state_dir)  # a user mistake recurs on resume: leave nothing behind
        raise


def _recover(model_dir, out_dir, o: RecoverOptions, device: str, state_dir: Path, overwrite: bool, progress):
    start = time.perf_counter()
    tokenizer = _tokenizer(model_dir)  # the text checks need no weights: they fail before any is read
    train_ids = data.training_ids(tokenizer, o.recover_data)
    eval_ids, where = data.held_out_ids(tokenizer, o.recover_data, o.recover_eval_data)
    shared = data.check_no_overlap(train_ids, eval_ids, where)
    train = data.train_windows(train_ids, o.recover_seqlen, o.recover_batch, o.recover_seed)
    held_out = data.held_out_windows(tokenizer, eval_ids, o.recover_seqlen, o.recover_eval_windows)
    model = _load_student(model_dir)
    targets = None if o.recover == "full-distill" else lora.resolve_targets(model, o.recover_targets)
    key = _run_key(o, device, model_dir)
    teacher_target, teacher_record, free = None, None, None
    if o.recover != "lora":
        teacher_target, teacher_record, free = _teacher(model_dir, model, o, device, train, state_dir, key, progress)

    torch.manual_seed(o.recover_seed)  # LoRA's initialisation and dropout
    table_before = model.embed_tokens.weight.detach().clone() if targets is not None else None
    model.to(device)
    if targets is None:
        model.requires_grad_(True)
        trainable, params = model, dict(model.named_parameters())  # tied table and head: one parameter
    else:
        trainable = lora.add_lora(model, targets, o.recover_rank, o.recover_alpha, o.recover_dropout)
        params = {n: p for n, p in trainable.named_parameters() if p.requires_grad}
    outcome = loop.train(trainable, params, teacher_target, train, held_out, o, device, state_dir, key, progress)
    del teacher_target
    model = lora.merge(trainable) if targets is not None else trainable
    model.requires_grad_(False)
    model = model.to("cpu").eval()
    if table_before is not None and not torch.equal(table_before, model.embed_tokens.weight):
        raise RuntimeError("LoRA changed the token table")  # a bug, never a user mistake
    snap = outcome.snapshot
    record = {
        "method": o.recover,
        "input": str(model_dir),
        "teacher": teacher_record and teacher_record["source"],
        "teacher_placement": teacher_record,
        "device": device,
        "options": asdict(o),
        "lora_targets": targets,
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "data": {"train": {"source": o.recover_data, "split": "train", "tokens": int(train_ids.numel())},
                 "eval": where | {"windows": len(held_out), "seqlen": o.recover_seqlen,
                                  "overlap_with_train": shared}},
        "steps": snap.step,
        "tokens_seen": snap.tokens,
        "best": {"step": snap.best_step, "eval_ppl": snap.best_ppl},
        "eval_ppl_before": snap.curve[0]["eval_ppl"],
        "curve": snap.curve,
        "timing": {"wall_seconds": round(time.perf_counter() - start, 2),
                   "train_seconds_this_run": round(outcome.seconds, 2),
                   "resumed_from_step": outcome.resumed_from,
                   "peak_memory_bytes": report.peak_memory_bytes(device),
                   "free_bytes_at_teacher_placement": free},
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in COPIED:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        report.write(tmp, record)
    checkpoint.discard(state_dir)
    return RecoverResult(out_dir, record)
