"""Cached generation is the same function as uncached generation, on every path a user takes.

transformers changed how `generate` hands the KV cache to `forward` (`cache=` from 5.24 on). A model
that missed the new name started a fresh cache every step and attended to one token: plausible text,
wrong numbers. Here one sliced model per architecture generates 32 greedy tokens five ways — cached
`generate`, uncached `generate`, a manual loop that recomputes the whole prefix each step, ONNX Runtime
with its KV inputs, and onnxruntime-genai — and every way must give the same ids. The shape (3 layers,
head_dim 32, 4 query / 2 KV heads) is one the 2-layer tiny configs cannot stand in for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.onnx import ExportOptions, export_onnx
from exporters.genai import GENAI_CONFIG, export_genai, genai_generate, load_genai_model
from runtime.generate import greedy_generate
from runtime.sessions import OrtSession
from tiny_models import ARCHS, VOCAB, WIDE, tiny_hf_model, tiny_tokenizer
from toolchain.model.adapters import to_canonical
from toolchain.compress.options import SliceOptions
from toolchain.compress.slicegpt import slice_model
from toolchain.model.modeling import OUTPUT_CACHE_FIELD, given_cache

NEW_TOKENS = 32
PAD = 0
PROMPTS = ([5, 17, 33, 90, 12, 7, 44, 101], [9, 88, 23, 61, 70])  # the second one is left-padded by 3


def wide_sliced(arch: str):
    model = to_canonical(tiny_hf_model(arch, seed=1, **WIDE)).eval()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(3, VOCAB, (16, 24), generator=gen)
    return slice_model(model, calib, torch.ones_like(calib), SliceOptions(slice=0.3))


def left_padded(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def manual_greedy(model, ids: torch.Tensor, mask: torch.Tensor | None, eos: int) -> list[list[int]]:
    """The reference: no cache at all, the whole sequence recomputed for every new token."""
    mask = torch.ones_like(ids) if mask is None else mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    new = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            token = torch.where(done, PAD, logits[:, -1].argmax(-1))
            done |= token == eos
            new.append(token)
            if done.all():
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
    return torch.stack(new, dim=1).tolist()


def hf_generate(model, ids, mask, eos: int, use_cache: bool) -> list[list[int]]:
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
                             eos_token_id=eos, pad_token_id=PAD, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def unused_token_as_eos(model) -> int:
    """Make EOS a token none of the runs below emits, so every path runs the full 32 tokens (a random
    tiny model stops early otherwise; EOS handling is tested with the deploy packages)."""
    emitted = set()
    for ids, mask in ((torch.tensor([PROMPTS[0]]), None), left_padded(PROMPTS)):
        emitted.update(t for row in manual_greedy(model, ids, mask, eos=-1) for t in row)
    eos = min(set(range(3, VOCAB)) - emitted)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    return eos


@pytest.fixture(scope="module")
def deploy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generate-equality")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generate_equals_every_other_path(arch, deploy_root):
    og = pytest.importorskip("onnxruntime_genai")
    del og
    model = wide_sliced(arch)
    eos = unused_token_as_eos(model)
    onnx_dir = deploy_root / arch / "onnx"
    export_onnx(model, onnx_dir, ExportOptions())
    package = deploy_root / arch / "genai"
    export_genai(onnx_dir, package, tokenizer=deploy_root / "tokenizer")
    assert json.loads((package / GENAI_CONFIG).read_text())["model"]["eos_token_id"] in (eos, [eos])
    session = OrtSession(onnx_dir)
    genai_model = load_genai_model(package)

    # batch 1, no attention mask: the README's `model.generate(**tok(text, return_tensors="pt"))`
    ids = torch.tensor([PROMPTS[0]])
    reference = manual_greedy(model, ids, None, eos)
    assert hf_generate(model, ids, None, eos, use_cache=True) == reference
    assert hf_generate(model, ids, None, eos, use_cache=False) == reference
    assert greedy_generate(session, ids.numpy(), max_new_tokens=NEW_TOKENS, eos_token_id=eos).tolist() == reference
    assert genai_generate(genai_model, PROMPTS[0], NEW_TOKENS) == reference[0]

    # batch 2 with left padding: every path on the padded batch, genai on each prompt alone
    ids, mask = left_padded(PROMPTS)
    reference = manual_greedy(model, ids, mask, eos)
    assert hf_generate(model, ids, mask, eos, use_cache=True) == reference
    assert hf_generate(model, ids, mask, eos, use_cache=False) == reference
    ort_tokens = greedy_generate(session, ids.numpy(), mask.numpy(), max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                 pad_token_id=PAD)
    assert ort_tokens.tolist() == reference
    for prompt, row in zip(PROMPTS, reference):
        assert genai_generate(genai_model, prompt, NEW_TOKENS) == row
    assert all(len(row) == NEW_TOKENS for row in reference)


def test_a_cache_in_a_form_the_model_cannot_read_is_an_error():
    model = wide_sliced("llama")
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(TypeError, match="legacy tuples"):
        model(input_ids=ids, cache=((torch.zeros(1, 2, 3, 32),) * 2,) * 3)
    with pytest.raises(TypeError, match="cache_params"):
        model(input_ids=ids, cache_params=object())
    cache = getattr(model(input_ids=ids, use_cache=True), OUTPUT_CACHE_FIELD)
    with pytest.raises(ValueError, match="two different KV caches"):
        model(input_ids=ids[:, -1:], cache=cache, past_key_values=type(cache)())
    assert given_cache(None, cache, {}) is given_cache(cache, None, {}) is cache


def test_both_cache_names_continue_the_same_cache():
    """Decoding one token after a prefill gives the full-sequence logits, whichever name carries the cache."""
    model = wide_sliced("phi3")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = getattr(model(input_ids=ids[:, :-1], use_cache=True), OUTPUT_CACHE_FIELD)
            step = model(input_ids=ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            assert torch.allclose(step, full, atol=1e-5), name
