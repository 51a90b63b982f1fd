"""Sampling from a training checkpoint: the CLI rebuilds the trained model and decodes with it."""

import json

import pytest
import torch

from lrt_model import sample
from lrt_model.config import ModelConfig, RecurrenceConfig
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
