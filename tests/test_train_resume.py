"""Kill-and-resume: `python -m phi3v.train sft` killed with SIGKILL mid-epoch after the first epoch and resumed with
--resume ends with bit-identical weights (float32, same seed); a half-written checkpoint is ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_chat_jsonl
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.checkpoint.safetensors import read_state_dict
from phi3v.models import load_config
from phi3v.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from phi3v.train.loop import make_optimizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEXT_LIKE = SHARED / "reference" / "Phi-3.5-mini-instruct"
QA = [("Capital of France?", "Paris."), ("Sky color?", "Blue."), ("Cat legs?", "Four."), ("2+2?", "4."),
      ("Say hi.", "Hi!")]  # 5 samples, batch 2: epochs of 3 batches (2, 2, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    model = create_random(TEXT_LIKE, d / "model", seed=0, layers=2, hidden=64, heads=4, intermediate=96,
                          dtype="float32")
    data = d / "train.jsonl"
    write_chat_jsonl(data, QA)
    return d, model, data


def command(model, data, out, *extra):
    return [sys.executable, "-m", "phi3v.train", "sft", "--model", str(model), "--data", str(data), "--out", str(out),
            "--steps", "10", "--batch", "2", "--lr", "5e-3", "--warmup", "2", "--save-every", "4", "--seed", "3",
            *extra]


def test_killed_run_resumes_to_bit_identical_weights(setup):
    d, model, data = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(command(model, data, d / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(command(model, data, d / "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = d / "killed" / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 240
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for the checkpoint itself, not for a time
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    done = list_checkpoints(d / "killed")
    assert done and not (d / "killed" / "model.safetensors").exists()  # it never reached the export
    loader = torch.load(done[-1] / "state.pt", weights_only=False)["loader"]
    assert loader["epoch"] >= 1 and 0 < loader["offset"] < len(QA)  # killed mid-epoch, after the first epoch
    # a checkpoint killed while being written: a temp folder of a later step, half filled
    partial = d / "killed" / "checkpoints" / ".tmp-step-00000009-12345"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(d / "killed") == done[-1]

    resumed = subprocess.run(command(model, data, d / "killed", "--resume"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {done[-1]}" in resumed.stderr
    a, b = read_state_dict(d / "full"), read_state_dict(d / "killed")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics of the resumed run continue the killed one's: same losses, bit for bit, each step once
    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert losses(d / "killed") == losses(d / "full") and [s for s, _ in losses(d / "full")] == list(range(1, 11))
    assert not partial.exists()  # the next save cleared the leftover


def test_checkpoint_round_trip_and_pruning(setup, tmp_path):
    _, model_dir, _ = setup
    model = load_causal_lm(model_dir, load_config(model_dir), torch.float32)
    opt = make_optimizer([{"name": "all", "params": list(model.parameters())}], 1e-3)
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    opt.step()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, loader_state={"epoch": 0, "offset": step},
                        keep=2)
    next_draw = torch.rand(3)  # what the run would draw next
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    torch.manual_seed(999)
    other = load_causal_lm(model_dir, load_config(model_dir), torch.float32)
    other_opt = make_optimizer([{"name": "all", "params": list(other.parameters())}], 1e-3)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=other, optimizer=other_opt)
    assert state["step"] == 6 and state["loader"] == {"epoch": 0, "offset": 6} and state["micro_step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    moments = [o.state[o.param_groups[0]["params"][-1]]["exp_avg"] for o in (opt, other_opt)]
    assert moments[0].abs().sum() > 0 and torch.equal(*moments)
    assert torch.equal(torch.rand(3), next_draw)  # the RNG continues where the checkpoint left it


def test_a_fresh_run_refuses_an_out_folder_with_checkpoints(setup, tmp_path):
    from phi3v.errors import InputError
    from phi3v.train.config import TrainConfig
    from phi3v.train.run import fit, prepare

    _, model_dir, data = setup
    cfg = TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path), steps=1, batch=2, save_every=1)
    fit(prepare(cfg))
    with pytest.raises(InputError, match="pass --resume"):
        fit(prepare(cfg))
