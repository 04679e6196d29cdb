"""Helpers shared by the benchmark scripts: machine/library facts, peak RSS, result files."""

from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama_shaped(hidden=768, layers=12, heads=12, kv_heads=12, inner=2048, vocab=32000, seed=0):
    """A Llama-shaped canonical model with random weights (latency and slicing cost do not depend on values)."""
    import torch
    import transformers as tf

    from toolchain.model.adapters import to_canonical

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                            tie_word_embeddings=False)
    return to_canonical(tf.LlamaForCausalLM(config).eval(), source_model=f"random-llama-{hidden}x{layers}")


def write_results(name: str, payload: dict, markdown: str) -> Path:
    from toolchain.core.reports import write_report

    return write_report(RESULTS, payload, lambda _: markdown, name)["json"]
