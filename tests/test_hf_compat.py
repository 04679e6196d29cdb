"""What other libraries read from our output dirs: the tokenizer files name a class transformers 4.x
knows, and config.json describes the source architecture with the graph's KV dims (the optimum round
trip itself runs in the slow tier: tests/test_optimum.py)."""

from __future__ import annotations

import json

from tiny_models import tiny_tokenizer

from exporters.hf_config import CANONICAL_CONFIG, optimum_incompatibility, source_config
from toolchain.core.tokenizer_files import copy_tokenizer_files
from toolchain.model.modeling import SlicedConfig


def test_copied_tokenizer_names_a_class_both_transformers_majors_know(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "src")
    assert json.loads((tmp_path / "src" / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    (tmp_path / "out").mkdir()
    copy_tokenizer_files(tmp_path / "src", tmp_path / "out")
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert written["model_input_names"] == ["input_ids", "attention_mask"]  # 4.x would add token_type_ids
    again = AutoTokenizer.from_pretrained(tmp_path / "out")  # and transformers 5 loads it as before
    text = "the cat sat on the mat"
    assert again(text).input_ids == tokenizer(text).input_ids and list(again(text)) == list(tokenizer(text))


def _config(**fields) -> SlicedConfig:
    return SlicedConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, source_architecture="Qwen2ForCausalLM",
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **fields)


def test_config_json_is_the_source_architecture_with_the_graph_kv_dims():
    config = _config(residual_widths=[40] * 5)
    hf = source_config(config, "fp16")
    assert hf["model_type"] == "qwen2" and hf["architectures"] == ["Qwen2ForCausalLM"]
    assert hf["num_key_value_heads"] == 2 and hf["hidden_size"] // hf["num_attention_heads"] == 16
    assert hf["rope_theta"] == 1e6 and hf["rope_scaling"] is None and hf["torch_dtype"] == "float16"
    assert hf["sliced"]["residual_widths"] == [40] * 5 and hf["sliced"]["canonical_config"] == CANONICAL_CONFIG
    assert hf["sliced"]["optimum_compatible"] is True and optimum_incompatibility(config) is None


def test_per_layer_head_dims_are_declared_optimum_incompatible():
    config = _config(qk_head_dims=[16, 8], v_head_dims=[16, 12])  # as MoDeGPT leaves them
    assert "head dims" in optimum_incompatibility(config)
    assert source_config(config, "fp32")["sliced"]["optimum_compatible"] is False
