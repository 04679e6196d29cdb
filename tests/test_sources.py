"""--model resolution: local dirs, GGUF conversion, hub ids offline, and every refusal path."""

import json
import pickle

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from toolchain.data import sources
from toolchain.core.errors import ArtifactError, ModelNotFoundError, UnsafeWeightsError
from toolchain.data.sources import SHORT_NAMES, load_hf_model, resolve_model




def tiny_llama(vocab=300, tie=False):
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def write_tiny_gguf(path, seed=0):
    """A 2-layer llama GGUF (F32) with a small byte-level BPE vocab; returns the HF model it encodes."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(seed)
    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    model = tiny_llama(vocab=len(tokens))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)

    def llama_cpp_order(w, heads):  # llama.cpp interleaves q/k rows; transformers undoes it on load
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = llama_cpp_order(array, 4)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_order(array, 2)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def saved_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def test_local_dir_resolves_and_loads_same_weights(saved_dir):
    path, model = saved_dir
    resolved = resolve_model(str(path))
    assert resolved.kind == "dir" and resolved.path == path and resolved.source == str(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = AutoModelForCausalLM.from_pretrained(path)  # load_hf_model also needs tokenizer files
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./no/such/model_dir")


def test_dir_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


class _Trap:
    """Unpickling this creates a file: proof that something ran pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickle_only_dir_refused_and_never_unpickled(tmp_path, saved_dir, weights):
    path, _ = saved_dir
    (path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / weights).write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(UnsafeWeightsError, match="safetensors") as err:
        resolve_model(str(path))
    assert "save_pretrained" in str(err.value)  # the message says how to convert
    with pytest.raises(UnsafeWeightsError):
        resolve_model(str(path / weights))  # a pickle file passed directly
    assert not marker.exists()


def test_truncated_safetensors(saved_dir):
    path, _ = saved_dir
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UnsafeWeightsError, match="corrupted or truncated"):
        resolve_model(str(path))


def test_shapes_disagreeing_with_config(saved_dir):
    path, _ = saved_dir
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    resolved = resolve_model(str(path))  # headers are fine; the shapes clash only with the config
    with pytest.raises(ArtifactError, match="disagree with config.json"):
        load_hf_model(resolved)


def test_hub_id_not_cached_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("some-org/some-model-that-is-not-cached")
    message = str(err.value)
    assert "not in the Hugging Face cache" in message and "offline" in message
    assert "hf download some-org/some-model-that-is-not-cached" in message and "local checkpoint dir" in message


def test_short_names_map_to_hub_ids(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert SHORT_NAMES["phi-2"] == "microsoft/phi-2"
    assert SHORT_NAMES["llama-2-7b"] == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(ModelNotFoundError, match="facebook/opt-125m"):
        resolve_model("OPT-125m")  # short names are case-insensitive


def test_gguf_converted_once_into_safetensors_dir(tmp_path, cache, monkeypatch):
    gguf_file = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(gguf_file)
    resolved = resolve_model(str(gguf_file))
    assert resolved.kind == "gguf" and resolved.path.parent == cache / "gguf"
    names = {p.name for p in resolved.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".gguf"))] and not list(cache.glob("gguf/.*tmp*"))
    assert "quantization_config" not in json.loads((resolved.path / "config.json").read_text())

    model, tokenizer = load_hf_model(resolved)
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ids = tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, from_gguf(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)

    def no_second_conversion(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(sources, "_load_gguf", no_second_conversion)
    assert resolve_model(str(tmp_path)).path == resolved.path  # a dir holding exactly one .gguf, reused


def test_gguf_errors(tmp_path, cache):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ArtifactError, match="re-download"):
        resolve_model(str(tmp_path / "bad.gguf"))
    (tmp_path / "other.gguf").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="several GGUF"):
        resolve_model(str(tmp_path))
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())  # nothing half-written


@pytest.mark.slow
def test_smollm2_gguf_conversion_is_exact(cache):
    from toolchain.data.assets import smollm2_gguf_path

    gguf_path = smollm2_gguf_path()
    model, tokenizer = load_hf_model(resolve_model("smollm2-135m"))
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, from_gguf(ids).logits, rtol=0, atol=0)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
