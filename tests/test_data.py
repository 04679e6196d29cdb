"""Calibration/evaluation text and token windows."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toolchain.data.text import JOIN, eval_windows, load_documents, load_text, pad_batch, token_windows
from toolchain.core.errors import DataError, InvalidOptionError




def word_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over the words of `text` (ids 0..2 are <unk>, <s>, </s>)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in text.split():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


COUNTING = " ".join(f"w{i}" for i in range(1000))  # token i is word w{i}: id = i + 3


def test_ptb_splits_offline():
    test = load_text("ptb", "test")
    assert test.startswith("no it was n't black monday" + JOIN + "but while the new york stock exchange")
    assert "<unk>" in test and " N " in test
    sentences = load_documents("ptb", "valid")
    assert sentences == load_documents("ptb", "validation") and all(s == s.strip() and s for s in sentences)
    assert len(load_documents("ptb", "train")) > 10 * len(sentences)
    with pytest.raises(DataError, match="ptb has no split .* train or validation or test"):
        load_text("ptb", "dev-2")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as err:
        load_text("wikitext-103-nope")
    assert all(name in str(err.value) for name in ("ptb", "wikitext2", "c4", "alpaca", ".jsonl"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not a readable file"):
        load_text(str(tmp_path / "absent.txt"))


@pytest.mark.parametrize("name,content", [("empty.txt", b""), ("blank.txt", b" \n\n\t"), ("empty.jsonl", b"\n")])
def test_empty_file_rejected(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match="no text"):
        load_text(str(tmp_path / name))


def test_non_utf8_rejected(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        load_text(str(tmp_path / "latin1.txt"))


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert load_text(str(tmp_path / "a.txt")) == "line one\nline two\n"  # .txt is used as is
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "first" + JOIN + "second"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r'bad.jsonl:1 has no string field "text"'):
        load_text(str(tmp_path / "bad.jsonl"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta"], "id": [1, 2]}), tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "c.parquet")) == ["alpha", "beta"]
    pq.write_table(pa.table({"body": ["alpha"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match='no "text" column'):
        load_text(str(tmp_path / "d.parquet"))


def test_token_windows_deterministic_and_drawn_from_the_text():
    tokenizer = word_tokenizer(COUNTING)
    first = token_windows(tokenizer, COUNTING, nsamples=8, seqlen=16, seed=3)
    again = token_windows(tokenizer, COUNTING, nsamples=8, seqlen=16, seed=3)
    other = token_windows(tokenizer, COUNTING, nsamples=8, seqlen=16, seed=4)
    assert first.input_ids.shape == (8, 16) and first.input_ids.dtype == torch.long
    assert torch.equal(first.input_ids, again.input_ids) and not torch.equal(first.input_ids, other.input_ids)
    assert torch.equal(first.attention_mask, torch.ones(8, 16, dtype=torch.long))
    starts = first.input_ids[:, 0] - 3
    assert len(set(starts.tolist())) == 8 and all(s % 16 == 0 for s in starts.tolist())  # distinct, aligned
    assert torch.equal(first.input_ids - first.input_ids[:, :1], torch.arange(16).expand(8, 16))  # contiguous


def test_too_short_text_rejected():
    tokenizer = word_tokenizer(COUNTING)
    with pytest.raises(DataError) as err:
        token_windows(tokenizer, COUNTING, nsamples=100, seqlen=16, seed=0)
    message = str(err.value)
    assert "1000 tokens" in message and "100 x 16 = 1600" in message and "--nsamples" in message
    with pytest.raises(InvalidOptionError):
        token_windows(tokenizer, COUNTING, nsamples=0, seqlen=16)


def test_eval_windows_protocol():
    tokenizer = word_tokenizer(COUNTING)
    windows = eval_windows(tokenizer, COUNTING, seqlen=64)
    assert windows.input_ids.shape == (1000 // 64, 64)  # non-overlapping, tail dropped
    assert torch.equal(windows.input_ids.flatten(), torch.arange(3, 3 + 15 * 64))
    assert len(eval_windows(tokenizer, COUNTING, seqlen=64, max_windows=4)) == 4
    with_bos = eval_windows(tokenizer, COUNTING, seqlen=64, bos=True)
    assert torch.equal(with_bos.input_ids[:, 0], torch.ones(1000 // 63, dtype=torch.long))
    assert torch.equal(with_bos.input_ids[0, 1:], torch.arange(3, 66))
    assert with_bos.protocol["bos"].startswith("tokenizer BOS") and windows.protocol["stride"] == 64
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(tokenizer, COUNTING, seqlen=2000)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_masks_padding(side):
    batch = pad_batch([[5, 6, 7, 8], [9, 10]], pad_id=0, side=side)
    real = [5, 6, 7, 8, 9, 10]
    assert batch.input_ids[batch.attention_mask.bool()].tolist() == real
    assert (batch.input_ids[~batch.attention_mask.bool()] == 0).all()
    pads = batch.attention_mask[1].tolist()
    assert pads == ([1, 1, 0, 0] if side == "right" else [0, 0, 1, 1])


def test_hub_dataset_unavailable_offline_fails_fast(tmp_path, monkeypatch):
    import time

    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_text("wikitext2", "test")
    assert "Salesforce/wikitext" in str(err.value) and "--ppl ptb" in str(err.value)
    assert time.perf_counter() - start < 10  # no retry loop against an unreachable hub
