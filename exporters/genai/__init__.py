"""onnxruntime-genai packaging: `genai_config.json` (+ tokenizer files) beside an exported graph, so
`onnxruntime_genai.Model(dir)` loads the (sliced, optionally quantized) model and generates without
this project's code.

What onnxruntime-genai needs and how our graphs meet it:

* I/O names: our graphs already follow genai's decoder convention (input_ids, attention_mask,
  position_ids, past_key_values.%d.key/value → logits, present.%d.key/value); the config names them.
* model.type: genai picks its model class and a few behaviours from it. Every supported source
  architecture maps onto one of genai's decoder-only types (`MODEL_TYPES`); OPT, which genai has no
  type for, uses genai's generic "decoder" type (our graph takes explicit position_ids for it).
* KV cache: genai allocates ONE shape (batch, num_key_value_heads, length, head_size) for every past
  and present tensor of every layer. SliceGPT keeps head dims, so its graphs load as they are. MoDeGPT
  makes key/value head dims differ per layer (and key ≠ value); genai rejects such a graph ("Got
  invalid dimensions for input: past_key_values.0.value"). For those we write `model.genai.onnx`: the
  same graph (same weights file) whose KV inputs/outputs are zero-padded to the largest head dim
  (Slice after each past input, Pad before each present output). Exact: the padded columns are
  never read. Cost: KV memory of max(head dim) per layer instead of each layer's own.
* search.past_present_share_buffer: true for our fast graphs (one GroupQueryAttention per layer,
  which appends the new keys into the past buffer in place: genai then keeps one max_length buffer per
  layer instead of copying the cache every step); false for the basic/none graphs, which concatenate
  past and new keys (present length = past + new).
* Sliding windows (Mistral) live inside our graph (the attention mask), so the config declares none.

`validate_genai_config` checks the config against the graph before genai is ever called, so a
corrupted or mismatched config gives one clear ToolchainError instead of a crash inside genai.

Modules: config (writing genai_config.json, export_genai), kv_padding (model.genai.onnx), validate
(the config against its graph), run (onnxruntime-genai itself: load, generate, tokenizer check).
"""

from exporters.genai.config import (ESSENTIAL_TOKENIZER_FILES, GENERIC_TYPE, MODEL_TYPES, PADDED_MODEL_FILE, PROVIDERS,
                                    GenaiResult, ensure_tokenizer, export_dir, export_genai, genai_model_type,
                                    write_genai_config)
from exporters.genai.kv_padding import kv_dims, pad_kv_io
from exporters.genai.run import genai_generate, load_genai_model, tokenizer_check
from exporters.genai.validate import DECODER_TYPES, GENAI_CONFIG, GenaiConfigError, appends_in_place, validate_genai_config

__all__ = ["DECODER_TYPES", "ESSENTIAL_TOKENIZER_FILES", "GENAI_CONFIG", "GENERIC_TYPE", "MODEL_TYPES", "PADDED_MODEL_FILE",
           "PROVIDERS", "GenaiConfigError", "GenaiResult", "appends_in_place", "ensure_tokenizer", "export_dir",
           "export_genai", "genai_generate", "genai_model_type", "kv_dims", "load_genai_model", "pad_kv_io",
           "tokenizer_check", "validate_genai_config", "write_genai_config"]
