"""`phi3v train` output: a Hugging Face folder that transformers loads with phi3v's logits (1e-4), metrics.jsonl,
loss.png; the CLI flags come from TrainConfig and a TOML/YAML config file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from conftest import chat_records, write_chat_jsonl, write_jsonl
import phi3v
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.random import create_random
from phi3v.checkpoint.safetensors import read_state_dict
from phi3v.cli import train as train_cli
from phi3v.data.collate import Sample, collate
from phi3v.errors import InputError
from phi3v.models import load_config
from phi3v.train.config import TrainConfig
from phi3v.train.export import export_hf
from phi3v.train.loop import make_optimizer, train
from phi3v.train.losses import next_token_loss

transformers = pytest.importorskip("transformers")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEXT_LIKE = SHARED / "reference" / "Phi-3.5-mini-instruct"
QA = [("Capital of France?", "Paris."), ("Sky color?", "Blue."), ("Cat legs?", "Four.")]


def parse(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_trains_from_a_toml_config_and_transformers_loads_the_result(tmp_path, capsys):
    model = create_random(TEXT_LIKE, tmp_path / "model", seed=0, layers=2, hidden=64, heads=4, intermediate=96,
                          dtype="float32")
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(QA) + [{"messages": "oops"}])
    held = write_chat_jsonl(tmp_path / "eval.jsonl", [("Dog legs?", "Four.")])
    (tmp_path / "run.toml").write_text(f'model = "{model}"\ndata = "{data}"\neval-data = "{held}"\n'
                                       f'out = "{tmp_path / "out"}"\nsteps = 100\nbatch = 2\nlr = 1e-3\n'
                                       'eval_every = 2\n')
    assert train_cli.run(parse(["sft", "--config", str(tmp_path / "run.toml"), "--steps", "4"])) == 0  # flag wins
    err = capsys.readouterr().err
    assert f"bad record {data}:4" in err and "1 of 5 records skipped as bad" in err
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"),
                                                          (4, "train"), (4, "eval")]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in records if r["split"] == "train")
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    ours = phi3v.load(out, dtype="float32").model
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    start = read_state_dict(model)
    assert any(not torch.equal(v, read_state_dict(out)[k]) for k, v in start.items())  # it did train
    ids = torch.randint(0, 32000, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_trained_moe_exports_in_the_checkpoint_layout(tiny_moe, tmp_path):
    """Stacked experts go back to one tensor per expert; transformers' PhimoeForCausalLM loads the folder."""
    model = load_causal_lm(tiny_moe, load_config(tiny_moe), torch.float32)
    opt = make_optimizer([{"name": "all", "params": list(model.parameters())}], 1e-2)
    g = torch.Generator().manual_seed(0)
    batch = collate([Sample(torch.randint(0, 32000, (24,), generator=g).tolist(), [1] * 24, [], "t")], 32000)
    train(model, next_token_loss, iter([batch]), opt, steps=1)
    raw = json.loads((tiny_moe / "config.json").read_text())
    export_hf(model, raw, tiny_moe, tmp_path / "out")
    assert read_state_dict(tmp_path / "out").keys() == read_state_dict(tiny_moe).keys()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, 32000, (1, 40), generator=g)  # within original_max_position_embeddings (64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_config_files_and_flags(tmp_path):
    (tmp_path / "a.yaml").write_text("model: m\ndata: d.jsonl\ngrad-accum: 4\nstages:\n"
                                     "  - {steps: 5, train: [projector]}\ntask: pretrain\n")
    cfg = TrainConfig.from_file(tmp_path / "a.yaml", lr=0.5)
    assert (cfg.grad_accum, cfg.lr, cfg.stages[0].train, cfg.task) == (4, 0.5, ("projector",), "pretrain")
    (tmp_path / "b.toml").write_text("batchsize = 3\n")
    with pytest.raises(InputError, match="unknown setting"):
        TrainConfig.from_file(tmp_path / "b.toml")
    args = parse(["sft", "--model", "m", "--data", "d", "--grad-accum", "2", "--resume", "--num-crops", "4"])
    cfg = train_cli.config_from_args(args)
    assert (cfg.grad_accum, cfg.resume, cfg.num_crops, cfg.batch) == (2, True, 4, TrainConfig.batch)
    with pytest.raises(InputError, match="--steps or --epochs"):
        TrainConfig(model="m", data="d", steps=3, epochs=1).check()
    with pytest.raises(InputError, match="stage"):
        TrainConfig(task="pretrain", stages="head:3")
