"""`toolchain deploy`: onnxruntime-genai and Triton packages."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from toolchain.app.commands.common import (BLOCK_SIZE_OPTION, VERBOSE_OPTION, QUANT_ALGORITHM_OPTION, QUANT_COMPUTE_OPTION, QUANTIZE_EMBEDDINGS_OPTION,
                                           RESIDUAL_BITS_OPTION, app, user_errors)
from toolchain.core.errors import InvalidOptionError


@app.command("deploy")
@user_errors
def deploy_command(
    source: Path = typer.Argument(..., help="A build dir (uses onnx/, or trt/ for --backend tensorrt) or an ONNX "
                                            "export dir (e.g. a quantized one)."),
    out: Path = typer.Option(..., "--out", "-o", help="--genai: the model dir to write; --triton: the model "
                                                      "repository (other models in it are kept)."),
    genai: bool = typer.Option(False, "--genai", help="Write an onnxruntime-genai model dir (genai_config.json)."),
    triton: bool = typer.Option(False, "--triton", help="Write a Triton Inference Server model repository."),
    backend: str = typer.Option("onnxruntime", "--backend", help="Triton backend: onnxruntime | tensorrt (needs a "
                                                                 "TensorRT bundle with engine/model.plan)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int4 | int8: weight-only quantize the fp32 "
                                                                     "export first (onnxruntime's quantizers)."),
    block_size: int = BLOCK_SIZE_OPTION,
    quant_algorithm: str = QUANT_ALGORITHM_OPTION,
    quant_compute: str = QUANT_COMPUTE_OPTION,
    quantize_embeddings: bool = QUANTIZE_EMBEDDINGS_OPTION,
    residual_bits: int = RESIDUAL_BITS_OPTION,
    name: Optional[str] = typer.Option(None, "--name", help="Triton model name (default: llm)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Triton max_batch_size (dynamic batching up to it)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="genai: tokenizer dir or hub id when the "
                                                                      "export has no tokenizer files."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out (genai) or model (triton)."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Package a model for the runtime users already run: onnxruntime-genai or Triton (optionally int4/int8)."""
    import tempfile

    if genai == triton:
        raise InvalidOptionError("pass exactly one of --genai or --triton")
    if backend not in ("onnxruntime", "tensorrt"):
        raise InvalidOptionError(f"unknown --backend {backend!r}; choose onnxruntime or tensorrt")
    if genai and backend != "onnxruntime":
        raise InvalidOptionError("--backend applies to --triton; onnxruntime-genai runs the ONNX graph")
    if quantize is not None and backend == "tensorrt":
        raise InvalidOptionError("--quantize produces an ONNX graph for onnxruntime; the TensorRT backend serves the "
                                 "bundle's engine (drop --quantize or use --backend onnxruntime)")
    source = source.expanduser()
    calibration = None
    if quantize is not None and quant_algorithm == "gptq":
        calibration = _build_calibration(source)
    if backend == "tensorrt" and (source / "trt").is_dir():
        source = source / "trt"
    elif (source / "onnx" / "export_config.json").is_file():
        source = source / "onnx"
    printer = Console()
    with contextlib.ExitStack() as stack:
        if quantize is not None:
            from exporters.quantize import QuantizeOptions, accuracy_level, quantize_onnx

            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".deploy-", dir=_existing_parent(out))))
            result = quantize_onnx(source, scratch / "quantized", calibration=calibration, options=QuantizeOptions(
                mode=quantize, block_size=block_size, algorithm=quant_algorithm,
                accuracy_level=accuracy_level(quant_compute), embeddings=quantize_embeddings,
                residual_bits=residual_bits))
            sizes, parity = result.report["sizes"], result.report["parity"]
            printer.print(f"quantized {quantize}: {sizes['quantized_bytes'] / 2**20:.1f} MB ({sizes['ratio']:.2f} x fp32), "
                          f"top-1 agreement with fp32 {parity['top1']:.3f}", highlight=False)
            source = result.out_dir
        if genai:
            from exporters.genai import export_genai

            from toolchain.app.model_card import write_model_card

            done = export_genai(source, out, overwrite=force, tokenizer=tokenizer)
            write_model_card(out)  # README.md: the package's card (a copied export card would describe the export)
            padded = f"; KV padded to head size {done.head_size} in layers {done.padded_layers}" if done.padded_layers else ""
            printer.print(f"wrote {done.config_path} (model.type {done.model_type}, {done.model_file}{padded}); load it "
                          f"with onnxruntime_genai.Model({str(out)!r})", highlight=False)
        else:
            from exporters.triton import write_triton_repository

            repo = write_triton_repository(source, out, name=name or "llm", backend=backend,
                                           max_batch_size=max_batch, overwrite=force)
            check = f"validated with {repo.validated_with}" if repo.validated_with else \
                "not validated (pip install tritonclient[grpc])"
            printer.print(f"wrote {repo.model_dir} ({backend}, {len(repo.inputs)} inputs, {len(repo.outputs)} outputs, "
                          f"max_batch_size {repo.max_batch_size}; {check})", highlight=False)


def _existing_parent(path: Path) -> str:
    parent = path.expanduser().absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def _build_calibration(source: Path):
    """GPTQ's canonical model and calibration text: a build dir's sliced/ and the build's --calib
    settings (an export dir holds only the ONNX graph)."""
    import json

    from exporters.gptq_weights import Calibration
    from toolchain.core.build_dirs import model_dir

    if not (model_dir(source) / "config.json").is_file():
        raise InvalidOptionError(f"--quant-algorithm gptq calibrates the canonical model, which {source} does not hold; "
                                 "pass a build dir (with sliced/), or use --quant-algorithm minmax|hqq")
    manifest = source / "manifest.json"
    options = json.loads(manifest.read_text()).get("options", {}) if manifest.is_file() else {}
    defaults = Calibration(model_dir(source))
    return Calibration(model_dir(source), options.get("calib", defaults.text), options.get("nsamples", defaults.nsamples),
                       options.get("seqlen", defaults.seqlen))
