"""benchmarks/cuda_bench.py, the GPU lease's one prepared script, run here on the CPU on a tiny model (a check of its
logic: its checks pass and every measurement it reports is there; the figures themselves mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_bench.py"
LIKE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "Phi-3.5-mini-instruct"


def load_script():
    spec = importlib.util.spec_from_file_location("cuda_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_the_cuda_script_runs_its_checks_and_measurements_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = load_script().main(["--device", "cpu", "--like", str(LIKE), "--layers", "1", "--hidden", "128", "--heads",
                             "4", "--intermediate", "256", "--prompt-tokens", "8", "--new-tokens", "3", "--batches",
                             "1,2", "--reps", "1", "--train-batch", "2", "--train-length", "16", "--train-steps", "1",
                             "--json", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    checks = [r for r in records if "check" in r]
    assert [c["ok"] for c in checks] == [True, True, True]  # float32 logits, int8 layers, int4 layers
    assert checks[0]["max_abs_diff"] < 1e-3 and checks[0]["top1_agree"] == 1.0
    assert checks[1]["kernels"] and checks[2]["kernels"] and checks[1]["layers"] == checks[2]["layers"] == 5
    runs = {(r["backend"], r["width"], r["batch"]) for r in records if "width" in r}
    assert runs == {(b, w, n) for b, w in [("phi3v", "bf16"), ("phi3v", "int8"), ("phi3v", "int4"),
                                            ("transformers", "bf16")] for n in (1, 2)}
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in records if "width" in r)
    train = [r for r in records if "train" in r]
    assert [r["backend"] for r in train] == ["phi3v", "transformers"]
    # the same initial weights, batch and optimizer: both runs' losses agree closely
    assert abs(train[0]["loss"] - train[1]["loss"]) < 0.05 * train[1]["loss"]
    printed = capsys.readouterr().out
    assert "checks: all passed" in printed and "training (bf16 autocast)" in printed


def test_without_a_gpu_the_cuda_script_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert load_script().main(["--device", "cuda"]) == 2


@pytest.mark.slow
def test_a_part_that_fails_is_reported_and_the_others_still_run(tmp_path):
    mod = load_script()

    def broken(*args):
        raise RuntimeError("no such kernel on this device")

    mod.transformers_inference = broken
    out = tmp_path / "results.json"
    rc = mod.main(["--device", "cpu", "--like", str(LIKE), "--layers", "1", "--hidden", "128", "--heads", "4",
                   "--intermediate", "256", "--prompt-tokens", "8", "--new-tokens", "3", "--batches", "1", "--reps",
                   "1", "--skip", "logits,train", "--json", str(out)])
    assert rc == 1
    records = json.loads(out.read_text())
    failed = [r for r in records if r.get("ok") is False]
    assert failed == [{"check": "transformers inference ran", "error": "RuntimeError: no such kernel on this device",
                       "ok": False}]
    assert {r["width"] for r in records if r.get("backend") == "phi3v"} == {"bf16", "int8", "int4"}
