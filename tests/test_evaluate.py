"""Perplexity protocol, padding exclusion, the lm-eval bridge, reports, and the `eval` command."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from test_data import word_tokenizer
from test_sources import tiny_llama
from typer.testing import CliRunner

from toolchain.data.text import Windows, eval_windows, pad_batch
from toolchain.core.errors import BackendUnavailableError, DataError, InvalidOptionError
from runtime.evaluate import perplexity, report_markdown, write_report, zero_shot




TEXT = " ".join(f"w{(i * 7) % 50}" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(TEXT)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return tiny_llama(vocab=60)


def test_perplexity_is_exp_of_mean_token_nll(model, tokenizer):
    result = perplexity(model, tokenizer, TEXT, seqlen=32, batch_size=3)
    windows = eval_windows(tokenizer, TEXT, seqlen=32)
    losses = []
    with torch.no_grad():
        for row in windows.input_ids:
            logits = model(row[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], row[1:], reduction="none"))
    by_hand = torch.cat(losses)
    assert result["tokens"] == by_hand.numel() == 12 * 31 and result["windows"] == 12
    assert result["nll"] == pytest.approx(by_hand.mean().item(), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(by_hand.mean().item()), rel=1e-5)
    assert result["protocol"]["stride"] == 32 and result["protocol"]["bos"].startswith("none")
    assert perplexity(model, tokenizer, TEXT, seqlen=32, max_windows=2)["tokens"] == 2 * 31


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_never_scored(model, side):
    rows = [[5, 9, 13, 20, 31, 8, 7, 40], [11, 12, 3], [44, 45, 46, 47, 48]]
    by_hand_nll, by_hand_tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            by_hand_nll += F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
            by_hand_tokens += len(row) - 1
    result = perplexity(model, None, pad_batch(rows, pad_id=17, side=side), batch_size=3)
    assert result["tokens"] == by_hand_tokens == 7 + 2 + 4
    assert result["nll"] == pytest.approx(by_hand_nll / by_hand_tokens, rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_session_is_scored_like_its_model(model, side):
    """Torch models and Sessions (here torch through the Session interface; ORT the same way) share one
    perplexity: same windows, same scored tokens, same NLL, and the scored logits rows are handed out."""
    from runtime.sessions import TorchSession

    windows = pad_batch([[5, 9, 13, 20, 31, 8, 7, 40], [11, 12, 3], [44, 45, 46, 47, 48]], pad_id=17, side=side)
    rows = []
    direct = perplexity(model, None, windows, batch_size=3)
    through_session = perplexity(TorchSession(model), None, windows, batch_size=3, on_scored=rows.append)
    assert through_session["tokens"] == direct["tokens"] == sum(len(r) for r in rows)
    assert through_session["nll"] == pytest.approx(direct["nll"], rel=1e-5)
    assert rows[0].shape == (direct["tokens"], 60) and rows[0].dtype == torch.float32


def test_memorised_sequence_has_perplexity_near_one():
    torch.manual_seed(0)
    model = tiny_llama(vocab=40).train()
    sequence = torch.randint(3, 40, (1, 32))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model(sequence).logits
        loss = F.cross_entropy(logits[0, :-1], sequence[0, 1:])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    result = perplexity(model, None, Windows(sequence, torch.ones_like(sequence)))
    assert result["ppl"] < 1.1
    fresh = perplexity(tiny_llama(vocab=40), None, Windows(sequence, torch.ones_like(sequence)))
    assert fresh["ppl"] > 10  # an untrained model is far from 1: the metric does measure fit


def test_bad_options(model, tokenizer):
    with pytest.raises(InvalidOptionError, match="--batch-size"):
        perplexity(model, tokenizer, TEXT, seqlen=32, batch_size=0)
    with pytest.raises(DataError, match="lower --seqlen"):
        perplexity(model, tokenizer, "w1 w2 w3", seqlen=32)


def test_zero_shot_without_lm_eval(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"lm-eval.*pip install"):
        zero_shot(model, tokenizer, ["hellaswag"])


@pytest.mark.slow  # lm-eval indexes its ~15k task configs first (~10 s)
def test_zero_shot_task_data_not_cached(model, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(InvalidOptionError, match="unknown lm-eval task"):
        zero_shot(model, tokenizer, ["no_such_task_xyz"])
    with pytest.raises(DataError, match="hellaswag.*datasets cache"):
        zero_shot(model, tokenizer, ["hellaswag"])


def test_report_files(tmp_path):
    report = {"model": "tiny", "perplexity": {"dataset": "ptb", "split": "test", "ppl": 12.5, "nll": 2.5257,
                                              "tokens": 310, "windows": 10, "seqlen": 32, "seconds": 0.1,
                                              "protocol": {"stride": 32}}}
    paths = write_report(tmp_path / "out", report)
    assert json.loads(paths["json"].read_text()) == report
    markdown = paths["markdown"].read_text()
    assert markdown == report_markdown(report) and "| ptb | test | 12.500 |" in markdown and "stride: 32" in markdown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md"]  # no temp leftovers


@pytest.fixture
def model_dir(tmp_path, model, tokenizer):
    build = tmp_path / "build"
    model.save_pretrained(build / "sliced")
    tokenizer.save_pretrained(build / "sliced")
    (tmp_path / "text.txt").write_text(TEXT)
    return build


def test_eval_command_on_build_dir(model_dir, tmp_path, model, tokenizer):
    from toolchain.app.cli import app

    out = tmp_path / "report"
    args = ["eval", str(model_dir), "--ppl", str(tmp_path / "text.txt"), "--seqlen", "32", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output
    saved = json.loads((out / "eval.json").read_text())
    expected = perplexity(model, tokenizer, TEXT, seqlen=32)
    assert saved["perplexity"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert saved["resolved"] == str(model_dir / "sliced") and (out / "eval.md").is_file()


def test_eval_command_user_errors(model_dir):
    from toolchain.app.cli import app

    result = CliRunner().invoke(app, ["eval", str(model_dir), "--ppl", "nonsense-set", "--seqlen", "32"])
    assert result.exit_code == 2
    assert "error:" in result.output and "unknown dataset" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--seqlen", "0"])
    assert result.exit_code == 2 and "--seqlen" in result.output
