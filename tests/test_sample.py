"""Sampling from a training checkpoint: the CLI rebuilds the trained model and decodes with it."""

import json

import pytest
import torch

from lrt_model import sample
from lrt_model.config import ConfigError, ModelConfig, RecurrenceConfig
from lrt_model.decode import generate
from lrt_model.tokenizer import ByteTokenizer
from lrt_model.train import TrainConfig, train


@pytest.mark.parametrize("rec", [None, RecurrenceConfig(strategy="interleaved", passes=2)])
def test_sample_cli_decodes_with_the_trained_model(tmp_path, capsys, rec):
    model_cfg = ModelConfig(depth=1, head_dim=16, width=32, seq_len=32, recurrence=rec)
    train(TrainConfig(model=model_cfg, batch_size=4, tokens=6 * 4 * 32, eval_tokens=4 * 32, eval_every=100,
                      progress=False, icl={"evals": []}, checkpoint_dir=str(tmp_path), checkpoint_every=3))
    assert sample.main([str(tmp_path), "--prompt", "def ", "--tokens", "12", "--temperature", "0",
                        "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recurrence"] == (rec is not None) and len(out["samples"]) == 1 and out["tokens_per_s"] > 0

    model, tokenizer, _ = sample.load_model(str(tmp_path), torch.device("cpu"))
    trained = torch.load(tmp_path / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    tok = ByteTokenizer()
    prompt = torch.tensor([[tok.bos_id] + tok.encode("def ")])
    expected = generate(model, prompt, 12, temperature=0)
    assert out["samples"][0] == tok.decode(expected[0].tolist())

    assert sample.main([str(tmp_path), "--tokens", "5", "--samples", "2", "--seed", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr()
    assert "--- sample 1" in text.out and "tokens/s" in text.err


def test_sample_without_a_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in .*: train with --checkpoint-dir"):
        sample.main([str(tmp_path / "nothing"), "--device", "cpu"])
    with pytest.raises(ConfigError, match="no checkpoint in .*: train with --checkpoint-dir"):  # the library: typed
        sample.load_model(str(tmp_path / "nothing"), torch.device("cpu"))


def test_sample_starts_the_prompt_with_bos_and_checks_its_arguments(tmp_path, monkeypatch, capsys):
    train(TrainConfig(model=ModelConfig(depth=1, head_dim=16, width=32, seq_len=32), batch_size=4, tokens=2 * 4 * 32,
                      eval_tokens=4 * 32, eval_every=100, progress=False, icl={"evals": []},
                      checkpoint_dir=str(tmp_path)))
    seen = {}

    def recording_generate(model, prompt, n, **kw):
        seen["prompt"] = prompt
        return torch.zeros(prompt.shape[0], n, dtype=torch.long)

    monkeypatch.setattr(sample, "generate", recording_generate)
    assert sample.main([str(tmp_path), "--prompt", "ab", "--tokens", "40", "--device", "cpu"]) == 0
    assert seen["prompt"].tolist() == [[ByteTokenizer().bos_id, ord("a"), ord("b")]]
    assert "exceed the trained sequence length 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main([str(tmp_path), "--top-k", "-1"])
    with pytest.raises(SystemExit, match="pass the directory that holds latest.pt"):
        sample.main([str(tmp_path / "latest.pt")])


def test_a_missing_bpe_tokenizer_is_an_error_not_a_retrain(tmp_path):
    from lrt_model.data import DataError, build_text_dir_corpus
    from lrt_model.tokenizer import get_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.txt").write_text("hello world " * 50 + str(i))
    corpus = build_text_dir_corpus(str(src), str(tmp_path / "corpus"))
    with pytest.raises(DataError, match="tokenizer 'bpe:300' is not at .*tokenizer-bpe-300/tokenizer.json"):
        get_tokenizer("bpe:300", corpus, train_if_missing=False)
