"""torchrun --nproc_per_node 2 (gloo, CPU): DDP and FSDP2 give one process's loss curve with the same global batch,
export the same Hugging Face checkpoint, and an FSDP2 run resumed from its checkpoint ends bit-identical.

5 samples, micro-batches of 1 per rank accumulated twice (one process: batch 2, --grad-accum 2): each epoch ends
with a micro-batch of 1 sample, so rank 1's share is empty there (it runs a stand-in that counts zero), and the
units of a step differ between ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_chat_jsonl
import phi3v
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.checkpoint.safetensors import read_state_dict
from phi3v.data.loader import Loader, StandIn
from phi3v.models import load_config
from phi3v.train.config import TrainConfig
from phi3v.train.run import fit, prepare

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEXT_LIKE = SHARED / "reference" / "Phi-3.5-mini-instruct"
QA = [("Capital of France?", "Paris."), ("Sky color?", "Blue."), ("Cat legs?", "Four legs, as dogs have."),
      ("2+2?", "4."), ("Say hi.", "Hi!")]
STEPS = 6
COMMON = ["--steps", str(STEPS), "--lr", "5e-3", "--warmup", "2", "--seed", "3", "--grad-accum", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    model = create_random(TEXT_LIKE, d / "model", seed=0, layers=2, hidden=64, heads=4, intermediate=96,
                          dtype="float32")
    data = d / "train.jsonl"
    write_chat_jsonl(data, QA)
    single = d / "single"  # one process, batch 2 = the global micro-batch of 2 ranks x 1
    fit(prepare(TrainConfig(model=str(model), data=str(data), eval_data=str(data), eval_every=3, out=str(single),
                            batch=2, grad_accum=2, steps=STEPS, lr=5e-3, warmup=2, seed=3)))
    return d, model, data, single


def torchrun(model, data, out, *extra, timeout=150) -> str:
    """Run 2 ranks of `phi3v.train sft`; a hang is killed with its whole process group. Returns stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "phi3v.train", "sft", "--model", str(model), "--data", str(data), "--out", str(out),
           "--batch", "1", "--eval-data", str(data), "--eval-every", "3", *COMMON, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(extra)} did not finish in {timeout} s (a rank waiting on the others?)")
    assert proc.returncode == 0, err[-4000:]
    return err


def losses(out: Path) -> list[tuple[int, str, float]]:
    """(step, split, loss) of every metrics.jsonl line: train steps and the evaluations after steps 3 and 6."""
    return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def assert_same_run(out: Path, single: Path, rel: float, atol: float) -> None:
    a, b = losses(out), losses(single)
    assert [r[:2] for r in a] == [r[:2] for r in b] and [s for s, split, _ in a if split == "train"] == \
        list(range(1, STEPS + 1)) and [s for s, split, _ in a if split == "eval"] == [3, 6]
    for (*_, x), (*_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=rel)
    wa, wb = read_state_dict(out), read_state_dict(single)
    assert wa.keys() == wb.keys() and all(wa[k].dtype == torch.float32 for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0)
    assert (out / "config.json").read_text() == (single / "config.json").read_text()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json" and p.name != "train_config.json") == \
        sorted(p.name for p in single.iterdir() if p.suffix == ".json" and p.name != "train_config.json")
    model = phi3v.load(out, dtype="float32")
    assert model.generate(QA[0][0], max_new_tokens=4, temperature=0).text is not None


def test_each_rank_takes_its_share_and_an_empty_share_is_a_stand_in():
    batches = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        it = iter(Loader(list(range(5)), 2 // world, list, seed=1, rank=rank, world=world))
        batches[rank, world] = [next(it) for _ in range(6)]  # 2 epochs of global batches of 2: (2, 2, 1) each
    assert [len(b) for b in batches[0, 1]] == [2, 2, 1, 2, 2, 1]
    for one, r0, r1 in zip(batches[0, 1], batches[0, 2], batches[1, 2]):
        if isinstance(r1, StandIn):  # the epoch's last sample went to rank 0; rank 1 runs a sample, weighted 0
            assert one == r0 and len(r1.batch) == 1
        else:
            assert sorted(one) == sorted(r0 + r1)
    assert sum(isinstance(b, StandIn) for b in batches[1, 2]) == 2


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_same_global_batch(setup):
    d, model, data, single = setup
    out = d / "ddp"
    torchrun(model, data, out, "--distributed", "ddp")
    assert_same_run(out, single, rel=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp_equals_one_process_and_resumes_bit_identical(setup):
    d, model, data, single = setup
    out = d / "fsdp"
    torchrun(model, data, out, "--distributed", "fsdp", "--save-every", "3")
    assert_same_run(out, single, rel=1e-5, atol=1e-5)
    ckpt = out / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt", "rng-0.pt",
                                                      "rng-1.pt", "state.pt"]
    moments = torch.load(ckpt / "optimizer.pt", weights_only=False)["state"]
    plain = load_causal_lm(model, load_config(model), torch.float32)  # gathered, not sharded: full shapes
    assert sorted(tuple(m["exp_avg"].shape) for m in moments.values()) == \
        sorted(tuple(p.shape) for p in plain.parameters())
    # a run stopped after the checkpoint of step 3, resumed on 2 ranks, ends where the uninterrupted one did
    resumed = d / "fsdp-resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    err = torchrun(model, data, resumed, "--distributed", "fsdp", "--save-every", "3", "--resume")
    assert f"resumed from {resumed / 'checkpoints' / ckpt.name}" in err
    a, b = read_state_dict(out), read_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(resumed) == [r for r in losses(out) if r[0] > 3]  # steps 4-6 and the last eval, bit for bit
