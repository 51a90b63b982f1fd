"""Checkpoints: a damaged latest checkpoint is detected by its checksum and the previous one is used;
the atomic write under them (lrt_model.fs)."""

from __future__ import annotations

import pytest
import torch

from lrt_model import checkpoint as ckpt
from lrt_model import fs as lfs
from lrt_model.config import ModelConfig
from lrt_model.train import TrainConfig, train


def _state(step: int) -> dict:
    return {"step": step, "w": torch.arange(1000.0) * step}


def _flip(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_latest_and_previous_are_kept_and_plain_torch_load_reads_them(tmp_path):
    for step in (1, 2, 3):
        ckpt.save(_state(step), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "previous.pt"]
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 3  # the trailer is invisible to torch
    assert torch.load(tmp_path / "previous.pt", weights_only=True)["step"] == 2
    assert ckpt.load(str(tmp_path))["step"] == 3


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty"])
def test_damaged_latest_gives_way_to_previous(tmp_path, capsys, damage):
    ckpt.save(_state(1), str(tmp_path))
    ckpt.save(_state(2), str(tmp_path))
    latest = tmp_path / "latest.pt"
    if damage == "flipped byte":
        _flip(latest)  # torch.load alone would return wrong weights here
    else:
        latest.write_bytes(latest.read_bytes()[: len(latest.read_bytes()) // 2] if damage == "truncated" else b"")
    state = ckpt.load(str(tmp_path))
    assert state["step"] == 1 and torch.equal(state["w"], _state(1)["w"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latest.pt is damaged" in err and "previous.pt" in err


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    ckpt.save(_state(1), str(tmp_path))
    ckpt.save(_state(2), str(tmp_path))
    _flip(tmp_path / "latest.pt")
    _flip(tmp_path / "previous.pt", 0.3)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(str(tmp_path))
    msg = str(e.value)
    assert "latest.pt is damaged" in msg and "previous.pt is damaged" in msg and f"delete {tmp_path}" in msg
    assert "\n" not in msg


def test_checkpoint_without_a_checksum_still_loads(tmp_path):
    torch.save(_state(7), tmp_path / "latest.pt")  # as written before checksums existed
    assert ckpt.load(str(tmp_path))["step"] == 7


def _tiny(**kw) -> TrainConfig:
    model = ModelConfig(depth=1, head_dim=16, width=32, seq_len=32)
    return TrainConfig(model=model, batch_size=4, tokens=30 * 4 * 32, eval_tokens=8 * 32, eval_every=10,
                       progress=False, icl={"evals": []}, **kw)


def test_training_resumes_exactly_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
    steady = train(_tiny())
    train(_tiny(checkpoint_dir=str(tmp_path), checkpoint_every=10, stop_after_steps=20))  # checkpoints at 10, 20
    assert torch.load(tmp_path / "previous.pt", weights_only=True)["step"] == 10
    _flip(tmp_path / "latest.pt")
    resumed = train(_tiny(checkpoint_dir=str(tmp_path), checkpoint_every=10))  # from step 10, not 20
    assert resumed["val_bpb"] == steady["val_bpb"] and resumed["steps"] == 30


def test_damaged_checkpoint_on_s3_gives_way_to_previous(s3_bucket):
    uri = f"s3://{s3_bucket}/ckpt"
    ckpt.save(_state(1), uri)
    ckpt.save(_state(2), uri)
    fs, root = lfs.resolve(uri)
    with fs.open_output_stream(f"{root}/latest.pt") as f:
        f.write(b"not a checkpoint")
    assert ckpt.load(uri)["step"] == 1


def test_write_atomic_replaces_keeps_a_backup_or_keeps_the_first_file(tmp_path, monkeypatch):
    fs, path = lfs.resolve(str(tmp_path / "sub" / "f.bin"))
    lfs.write_atomic(fs, path, b"one")  # creates its folder
    lfs.write_atomic(fs, path, b"two", backup="f.old")
    lfs.write_atomic(fs, path, b"three", replace=False)  # first writer wins
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"two" and (tmp_path / "sub" / "f.old").read_bytes() == b"one"
    with pytest.raises(ValueError, match="replace=True"):
        lfs.write_atomic(fs, path, b"x", replace=False, backup="f.old")

    with pytest.raises(TypeError):  # the write fails after the temporary file was opened
        lfs.write_atomic(fs, path, "not bytes")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.bin", "f.old"]  # no temp file left
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"two"
