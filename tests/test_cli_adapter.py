"""`--adapter DIR` on the inference commands: the adapter saved by the training code changes the answer exactly as
the same adapter applied in Python does."""

from __future__ import annotations

import json

import torch

from phi3v.api import load
from phi3v.cli import main
from phi3v.train.lora import apply_lora, lora_layers, save_adapter


def test_generate_with_adapter_equals_the_adapted_model(tiny_phi3, tmp_path, capsys):
    model = load(tiny_phi3, dtype="float32")
    apply_lora(model.model, r=4, alpha=8.0, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B is zero after init, which would change nothing
        for layer in lora_layers(model.model).values():
            layer.lora_B.weight.copy_(0.5 * torch.randn(layer.lora_B.weight.shape, generator=g))
    want = model.generate("Hi there", max_new_tokens=12)
    save_adapter(model.model, tmp_path / "adapter")
    base = load(tiny_phi3, dtype="float32").generate("Hi there", max_new_tokens=12)
    assert want.token_ids != base.token_ids  # the adapter matters

    argv = ["generate", "--model", str(tiny_phi3), "--dtype", "float32", "--prompt", "Hi there",
            "--max-new-tokens", "12", "--json"]
    assert main(argv + ["--adapter", str(tmp_path / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == base.token_ids


def test_a_missing_adapter_is_a_clear_error(tiny_phi3, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_phi3), "--dtype", "float32", "--prompt", "Hi",
                 "--adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope is not an adapter folder" in err[-1]
    assert len(err) == 1  # refused before the model was loaded (no note about its random weights yet)
