"""`--rotate` (orthogonal rotations folded into the weights) and `--method none` (convert only)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tiny_models import ARCHS, batch_with_left_padding, calibration_batch, logits, masked_max_diff, \
    save_tiny_checkpoint, tiny_hf_model
from toolchain.app.cli import app
from toolchain.compress.hadamard import construction
from toolchain.compress.options import CompressOptions, SliceOptions
from toolchain.compress.rotate import make_rotation, rotate_model
from toolchain.compress.slicegpt import slice_model
from toolchain.compress.stage import compress_to_dir
from toolchain.model.adapters import to_canonical

FAST = ["--nsamples", "4", "--seqlen", "32", "--no-bench"]


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def relative_change(model, rotated) -> float:
    """Largest logit change over the unpadded tokens, relative to the largest logit."""
    ids, mask, pos = batch_with_left_padding()
    before, after = logits(model, ids, mask, pos), logits(rotated, ids, mask, pos)
    return masked_max_diff(before, after, mask) / before[mask.bool()].abs().max().item()


@pytest.mark.parametrize("n", [12, 20, 28, 36, 40, 48, 56, 64, 400, 456, 512, 576])
def test_hadamard_rotations_are_orthogonal_with_equal_magnitude_entries(n):
    assert construction(n) is not None
    rotation = make_rotation(n, "hadamard", torch.Generator().manual_seed(0))
    q = rotation.matrix
    assert rotation.kind == "hadamard"
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), atol=1e-15)


@pytest.mark.parametrize("n", [6, 188])
def test_widths_without_a_construction_fall_back_to_a_recorded_random_rotation(n):
    rotation = make_rotation(n, "hadamard", torch.Generator().manual_seed(0))
    assert construction(n) is None and rotation.kind == "random"
    assert "no Hadamard construction" in rotation.construction
    assert torch.allclose(rotation.matrix @ rotation.matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def sliced(model, **options):
    return slice_model(copy.deepcopy(model), *calibration_batch(16), SliceOptions(slice=0.3, **options))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["random", "hadamard"])
def test_rotation_keeps_the_logits_dense_and_sliced_tied_and_untied(arch, mode):
    for keep_tie in (True, False):
        dense = to_canonical(tiny_hf_model(arch), keep_tie=keep_tie)
        # uneven widths (slice_head: the head reads a sliced width too) and both kinds of junction
        for model, heads in ((dense, False), (sliced(dense, slice_head=True), False), (sliced(dense, share="layer"), True)):
            rotated = copy.deepcopy(model)
            rotate_model(rotated, mode, seed=1, heads=heads)
            assert relative_change(model, rotated) <= 1e-5, (keep_tie, model.config.residual_widths, heads)
            changed = [n for n, p in rotated.named_parameters()
                       if not torch.equal(p, dict(model.named_parameters())[n])]
            assert changed, "nothing was rotated"
    exact = to_canonical(tiny_hf_model(arch), dtype=torch.float64)  # exact up to float64 rounding
    rotated = copy.deepcopy(exact)
    rotate_model(rotated, mode, seed=1, heads=True)
    assert relative_change(exact, rotated) <= 1e-12


def test_dense_rotation_adds_no_shortcut_and_keeps_the_tie():
    dense = to_canonical(tiny_hf_model("llama"))
    rotated = copy.deepcopy(dense)
    record = rotate_model(rotated, "hadamard", seed=0)
    assert not any(rotated.config.shortcuts)
    assert all(layer.attn_shortcut is None and layer.mlp_shortcut is None for layer in rotated.layers)
    assert rotated.lm_head.weight is rotated.embed_tokens.weight  # one table, read at both ends
    assert not torch.equal(rotated.embed_tokens.weight, dense.embed_tokens.weight)
    assert record["residual"] == {"64": {"kind": "hadamard", "construction": "sylvester(64)"}}


def test_tie_project_keeps_the_table_and_rotates_the_projections():
    dense = to_canonical(tiny_hf_model("qwen2"))
    for model in (dense, sliced(dense, tie="project")):
        rotated = copy.deepcopy(model)
        rotate_model(rotated, "random", seed=0, project_table=True)
        assert rotated.embed_proj is not None and rotated.lm_head.weight is rotated.embed_tokens.weight
        assert torch.equal(rotated.embed_tokens.weight, dense.embed_tokens.weight)
        assert relative_change(model, rotated) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_rotation_after_modegpt_keeps_the_logits(arch):
    from toolchain.compress.modegpt import ModegptOptions, modegpt_model

    model = modegpt_model(to_canonical(tiny_hf_model(arch)), *calibration_batch(16), ModegptOptions(compression=0.3))
    rotated = copy.deepcopy(model)
    rotate_model(rotated, "hadamard", seed=0, heads=True)  # reduced head dims: other orders, or the fallback
    assert not any(rotated.config.shortcuts)
    assert relative_change(model, rotated) <= 1e-5


def test_shortcuts_absorb_the_rotations():
    model = sliced(to_canonical(tiny_hf_model("phi3")), slice_head=True)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, "hadamard", seed=0)
    assert rotated.config.shortcuts == model.config.shortcuts
    assert relative_change(model, rotated) <= 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def _compress(checkpoint, out, **options):
    return compress_to_dir(CompressOptions(model=str(checkpoint), device="cpu", nsamples=4, seqlen=32, **options), out)


def test_method_none_converts_and_the_seed_fixes_the_bytes(checkpoint, tmp_path):
    plain = _compress(checkpoint, tmp_path / "plain", method="none")
    # the same model: the 5 norm scales fold into their readers, the tied head keeps the final one as a
    # D x D head_proj
    assert plain.compressed.total == plain.dense.total - 5 * 64 + 64 * 64 and plain.report["calibration"] is None
    first = _compress(checkpoint, tmp_path / "a", method="none", rotate="hadamard", seed=7)
    again = _compress(checkpoint, tmp_path / "b", method="none", rotate="hadamard", seed=7)
    other = _compress(checkpoint, tmp_path / "c", method="none", rotate="hadamard", seed=8)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b", "c")}
    assert weights["a"] == weights["b"] != weights["c"]
    assert first.compressed.total == plain.compressed.total
    report = json.loads((tmp_path / "a" / "compression_report.json").read_text())
    assert report["rotation"]["residual"]["64"]["kind"] == "hadamard" and report["method"] == "none"
    with safe_open(tmp_path / "a" / "model.safetensors", "pt") as f:  # the tie is kept: one table saved
        assert "embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    del other, again


def test_rotation_after_slicing_through_the_stage(checkpoint, tmp_path):
    result = _compress(checkpoint, tmp_path / "s", slice=0.3, rotate="hadamard", rotate_heads=True)
    assert result.report["streamed"] is False  # rotation needs the whole model
    assert result.report["rotation"]["residual"]["40"]["construction"].startswith("paley1")


def test_build_method_none_with_hadamard_passes_parity(checkpoint, tmp_path):
    out = tmp_path / "b"
    result = run_cli("build", "--model", checkpoint, "--method", "none", "--rotate", "hadamard", "--target", "onnx",
                     "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["compress"]["options"]["rotate"] == "hadamard"
    assert json.loads((out / "reports/parity/parity.json").read_text())["passed"] is True


def test_rotate_is_part_of_the_compress_key_only_when_used():
    from toolchain.app.pipeline import BuildOptions, _compress_key

    assert "rotate" not in _compress_key(BuildOptions(model="m"))
    assert _compress_key(BuildOptions(model="m", rotate="random"))["rotate"] == "random"


@pytest.mark.parametrize("args, fragment", [
    (["--rotate", "sideways"], "--rotate"),
    (["--rotate-heads"], "--rotate-heads needs"),
    (["--method", "none", "--target-ratio", "0.8"], "--method none compresses nothing"),
    (["--method", "nothing"], "--method"),
])
def test_bad_values_exit_2_with_one_error_line(args, fragment, tmp_path):
    for command in ("slice", "build"):
        result = run_cli(command, "--model", "m", "--out", tmp_path / command, *args)
        lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("> ")]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert fragment.lower() in lines[0].lower(), result.output
