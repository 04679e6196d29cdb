"""The compress stage: load a model, calibrate on text, compress, save an HF-style model dir.

`compress_to_dir` is what `toolchain slice` and the `compress` stage of `toolchain build` call.
Options are validated before anything heavy is loaded, and the output appears only when complete.

SliceGPT streams by default (toolchain/streaming.py): the checkpoint is read one layer at a time and
the sliced model is written shard by shard, so peak memory is about one layer plus one output shard,
not the model twice. `stream=False` (and every MoDeGPT method) loads the whole model instead.
`device="auto"` calibrates on CUDA when torch sees a GPU, else on the CPU; the compression report
records the device used.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolchain.compress.options import CompressOptions, resolve_device
from toolchain.core.errors import InvalidOptionError, OutputPathError
from toolchain.core.fileio import atomic_dir, write_json
from toolchain.model.sizes import ParameterReport, count_parameters


@dataclass
class CompressResult:
    out_dir: Path
    dense: ParameterReport
    compressed: ParameterReport
    seconds: float
    report: dict


def parameter_summary(dense: ParameterReport, compressed: ParameterReport) -> dict:
    return {
        "dense": dense.as_dict(),
        "compressed": compressed.as_dict(),
        "kept_fraction": compressed.total / dense.total,
        "compression": 1.0 - compressed.total / dense.total,
        "smaller": compressed.total < dense.total,
    }


def check_supported(model_dir: Path) -> None:
    """Refuse an architecture without an adapter from its config.json, before reading any weight."""
    import json

    from transformers import PretrainedConfig

    from toolchain.model.adapters import adapter_for
    from toolchain.core.errors import ModelNotFoundError

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{model_dir} has no config.json; pass an HF checkpoint dir, a .gguf file or a hub id")
    config = json.loads(config_path.read_text())
    adapter_for(PretrainedConfig(architectures=config.get("architectures") or [config.get("model_type", "?")]))


def streams(options: CompressOptions) -> bool:
    """Whether `options` take the streaming (layer by layer) path. Rotating (`--rotate`) revisits every
    layer after slicing, so it runs on the model in memory."""
    return options.stream and options.method == "slicegpt" and options.rotate == "none"


def _load_in_memory(options: CompressOptions, resolved):
    from toolchain.model.adapters import to_canonical
    from toolchain.data.sources import load_hf_model

    hf_model, tokenizer = load_hf_model(resolved, dtype=torch.float32)
    dense_params = count_parameters(hf_model)
    model = to_canonical(hf_model, source_model=options.model, keep_tie=options.tie != "untie")
    return model, tokenizer, dense_params, None


def _open_streamed(options: CompressOptions, resolved, tmp: Path):
    """Canonical skeleton (meta), tokenizer, dense parameter count and the layer-by-layer weight store."""
    from toolchain.data.sources import load_hf_config, load_tokenizer
    from toolchain.compress.streaming import ShardWriter, open_streamed

    hf_config = load_hf_config(resolved)  # headers, shapes: no tensor read
    model, weights, hf_meta = open_streamed(resolved.path, hf_config, ShardWriter(tmp), options.model,
                                            keep_tie=options.tie != "untie")
    tokenizer = load_tokenizer(resolved.path)
    return model, tokenizer, count_parameters(hf_meta), weights


def compress_to_dir(options: CompressOptions, out_dir: str | Path, overwrite: bool = False,
                    progress=None) -> CompressResult:
    from toolchain.compress.budget import ensure_smaller, weight_bytes
    from toolchain.compress.slicegpt import slice_model
    from toolchain.compress.slicegpt.widths import check_plan_is_smaller, resolve_widths
    from toolchain.data.text import load_text, token_windows
    from toolchain.data.sources import resolve_model

    options.validate()
    device = resolve_device(options.device)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputPathError(f"--out {out_dir} already exists; choose a new directory or remove it")
    start = time.perf_counter()
    resolved = resolve_model(options.model)
    check_supported(resolved.path)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # a streamed model is written while it is sliced
        if streams(options):
            model, tokenizer, dense_params, weights = _open_streamed(options, resolved, tmp)
        else:
            model, tokenizer, dense_params, weights = _load_in_memory(options, resolved)
        max_len = model.config.max_position_embeddings
        if options.seqlen > max_len:
            raise InvalidOptionError(f"--seqlen {options.seqlen} exceeds the model's maximum of {max_len}; lower it")
        target = options.target_params
        if options.target_ratio is not None:  # a fraction of the source's tied total
            target = int(options.target_ratio * dense_params.total)
        slice_options = options.slice_options(device, target)
        if options.method == "slicegpt":  # impossible widths, or a result that cannot be smaller: fail before calibrating
            check_plan_is_smaller(model, slice_options, dense_params.total, options.allow_larger)
        elif "slicegpt" in options.method:
            resolve_widths(model, slice_options)
        windows = None if options.method == "none" else \
            token_windows(tokenizer, load_text(options.calib, "train"), options.nsamples, options.seqlen, options.seed)
        offload = None if options.offload_activations is None else Path(options.offload_activations)
        if "slicegpt" in options.method:
            slice_model(model, windows.input_ids, windows.attention_mask, slice_options, progress=progress,
                        weights=weights, offload=offload)
        if "modegpt" in options.method:
            from toolchain.compress.modegpt import modegpt_model

            modegpt_model(model, windows.input_ids, windows.attention_mask, options.modegpt_options(),
                          progress=progress)
            if options.method == "slicegpt+modegpt":
                model.config.compression = {**model.config.compression, "slice": options.slice,
                                            "method": options.method}
        if options.method == "none":
            model.config.compression = {"method": "none"}
        rotated = None
        if options.rotate != "none":
            from toolchain.compress.rotate import rotate_model

            rotated = rotate_model(model, options.rotate, options.seed, heads=options.rotate_heads,
                                   project_table=options.tie == "project")
        compressed_params = count_parameters(model)
        if options.method != "none":  # converting only keeps the size (or grows it with --tie untie, as asked)
            ensure_smaller(compressed_params.total, dense_params.total, options.allow_larger,
                           f"--method {options.method}", "Compress more (--slice, --target-ratio, --compression)")
        report = {
            "source_model": options.model,
            "method": options.method,
            # where activations were kept changes no output byte: recorded as yes/no, not as a path
            "options": asdict(options) | {"offload_activations": options.offload_activations is not None},
            "device": device,
            "streamed": weights is not None,
            "parameters": parameter_summary(dense_params, compressed_params),
            "weight_bytes": {"dtype": str(model.dtype).removeprefix("torch."),  # both counted at the saved dtype
                             "dense": weight_bytes(dense_params.total, model.dtype),
                             "compressed": weight_bytes(compressed_params.total, model.dtype)},
            "residual_widths": model.config.residual_widths,
            "calibration": None if windows is None else windows.protocol | {"source": options.calib},
            "rotation": rotated,
        }  # no timings here: same inputs must give byte-identical outputs (the manifest keeps timings)
        if weights is None:
            model.save_pretrained(tmp)
        else:  # the tensors are already in shards; config and generation config as save_pretrained writes them
            model.save_pretrained(tmp, state_dict={})
            weights.writer.finish()
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "compression_report.json", report)
    return CompressResult(out_dir, dense_params, compressed_params, round(time.perf_counter() - start, 2), report)
