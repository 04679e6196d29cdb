"""Running a genai model dir with onnxruntime-genai: load (after our own config check), greedy generation,
and a tokenizer comparison. onnxruntime_genai is imported only here, when a function runs."""

from __future__ import annotations

import os
from pathlib import Path

from toolchain.core.errors import ArtifactError, BackendUnavailableError, first_line

from exporters.genai.validate import validate_genai_config


def load_genai_model(model_dir: str | Path, validate: bool = True):
    """`onnxruntime_genai.Model` over `model_dir`, after our own check of its config."""
    model_dir = Path(model_dir).expanduser()
    if validate:
        validate_genai_config(model_dir)
    og = _genai()
    try:
        return og.Model(str(model_dir))
    except Exception as err:  # noqa: BLE001  (genai raises RuntimeError/OrtException for everything)
        raise ArtifactError(f"onnxruntime-genai could not load {model_dir}: {first_line(err)}") from err


def genai_generate(model, prompt_ids, max_new_tokens: int = 32) -> list[int]:
    """Greedy generation through onnxruntime-genai: the new token ids (genai stops at EOS)."""
    import numpy as np

    og = _genai()
    if isinstance(model, (str, os.PathLike)):
        model = load_genai_model(model)
    prompt = np.asarray(prompt_ids, dtype=np.int32).reshape(1, -1)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=int(prompt.shape[1] + max_new_tokens))
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def tokenizer_check(model, hf_tokenizer, text: str) -> dict:
    """Does genai's tokenizer (onnxruntime-extensions) encode `text` like the transformers tokenizer?
    (Some pre-tokenizers, e.g. tokenizers' plain Whitespace, are not supported by genai.)"""
    og = _genai()
    ours = [int(t) for t in og.Tokenizer(model).encode(text)]
    theirs = list(hf_tokenizer(text, add_special_tokens=False).input_ids)
    # genai may add the special tokens the tokenizer config asks for (e.g. BOS): compare the text part
    same = ours == theirs or (bool(theirs) and ours[len(ours) - len(theirs):] == theirs)
    return {"text": text, "genai": ours, "transformers": theirs, "equal": same}


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise BackendUnavailableError("onnxruntime-genai is not installed; pip install onnxruntime-genai "
                                      "(CPU; onnxruntime-genai-cuda for CUDA)") from None
    return og
