"""The files that travel with a model so its tokenizer (and generation defaults) load beside any export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from toolchain.core.fileio import write_text

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
# tokenizer classes transformers 5 writes that 4.x does not know, and the 4.x class both load it as
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
DECODER_INPUT_NAMES = ("input_ids", "attention_mask")  # what transformers 5's TokenizersBackend returns


def copy_tokenizer_files(source: Path | None, out: Path, overwrite: bool = True) -> list[str]:
    """Copy whichever TOKENIZER_FILES `source` has into `out` (nothing when `source` is None); with
    overwrite=False files already in `out` are kept. Returns the names copied. The copied
    tokenizer_config.json names a class transformers 4.x knows too (portable_tokenizer_config)."""
    copied = []
    if source is None:
        return copied
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (overwrite or not (out / name).exists()):
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    if "tokenizer_config.json" in copied:
        portable_tokenizer_config(out)
    return copied


def portable_tokenizer_config(model_dir: Path) -> bool:
    """Rewrite `model_dir`/tokenizer_config.json in place when its tokenizer_class is one only
    transformers 5 knows; transformers 5 loads the replacement as the same fast tokenizer. Returns
    whether the file changed."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not ours to repair: the tokenizer loader reports it
    portable = PORTABLE_CLASSES.get(config.get("tokenizer_class"))
    if portable is None:
        return False
    config["tokenizer_class"] = portable
    # 4.x's class would also return token_type_ids, which a decoder's generate() refuses
    config.setdefault("model_input_names", list(DECODER_INPUT_NAMES))
    write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
