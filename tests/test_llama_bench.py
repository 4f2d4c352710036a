"""benchmarks/llama_bench.py: the GGUF conversion (read back with gguf's reader); the skip without llama-bench."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf  # noqa: E402  (a test dependency)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llama_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("llama_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def converted(tiny_phi3, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    load_script().convert(tiny_phi3, out, "bf16")
    return out


def test_gguf_metadata(tiny_phi3, converted):
    cfg = json.loads((tiny_phi3 / "config.json").read_text())
    r = gguf.GGUFReader(converted)
    assert field(r, "general.architecture") == "phi3"
    assert field(r, "phi3.block_count") == cfg["num_hidden_layers"]
    assert field(r, "phi3.embedding_length") == cfg["hidden_size"]
    assert field(r, "phi3.feed_forward_length") == cfg["intermediate_size"]
    assert field(r, "phi3.attention.head_count") == cfg["num_attention_heads"]
    assert field(r, "phi3.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert field(r, "phi3.context_length") == cfg["max_position_embeddings"]
    assert field(r, "phi3.rope.scaling.original_context_length") == cfg["original_max_position_embeddings"]
    assert field(r, "phi3.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert field(r, "phi3.attention.sliding_window") == cfg["sliding_window"]
    assert field(r, "phi3.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
    attn = (1 + np.log(scale) / np.log(cfg["original_max_position_embeddings"])) ** 0.5
    assert field(r, "phi3.rope.scaling.attn_factor") == pytest.approx(attn, rel=1e-6)
    assert field(r, "tokenizer.ggml.model") == "llama"
    tok = r.fields["tokenizer.ggml.tokens"]  # contents() of all 32064 strings is slow: read a few

    def token(i):
        return bytes(tok.parts[tok.data[i]]).decode()

    assert len(tok.data) == cfg["vocab_size"] == len(r.fields["tokenizer.ggml.token_type"].data)
    assert token(1) == "<s>" and token(32000) == "<|endoftext|>" and token(32007) == "<|end|>"
    assert field(r, "tokenizer.ggml.bos_token_id") == 1
    assert field(r, "tokenizer.ggml.eos_token_id") == 32000
    assert field(r, "tokenizer.ggml.unknown_token_id") == 0
    types = field(r, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and types[32007] == gguf.TokenType.CONTROL
    assert types[500] == gguf.TokenType.NORMAL


def test_gguf_tensors(tiny_phi3, converted):
    from safetensors.torch import load_file

    cfg = json.loads((tiny_phi3 / "config.json").read_text())
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    D = H // cfg["num_attention_heads"]
    qkv = H + 2 * cfg["num_key_value_heads"] * D
    r = gguf.GGUFReader(converted)
    t = {x.name: x for x in r.tensors}
    want = {"token_embd.weight": (H, V), "output.weight": (H, V), "output_norm.weight": (H,),
            "rope_factors_long.weight": (D // 2,), "rope_factors_short.weight": (D // 2,)}
    for i in range(L):  # ggml order: fastest-varying dimension first
        want |= {f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.attn_qkv.weight": (H, qkv),
                 f"blk.{i}.attn_output.weight": (H, H), f"blk.{i}.ffn_norm.weight": (H,),
                 f"blk.{i}.ffn_up.weight": (H, 2 * I), f"blk.{i}.ffn_down.weight": (I, H)}
    assert set(t) == set(want)
    for name, shape in want.items():
        assert tuple(int(s) for s in t[name].shape) == shape, name
    assert t["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert t["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    rs = cfg["rope_scaling"]
    np.testing.assert_array_equal(t["rope_factors_long.weight"].data, np.float32(rs["long_factor"]))
    np.testing.assert_array_equal(t["rope_factors_short.weight"].data, np.float32(rs["short_factor"]))
    # the weights themselves: bf16 bits round-trip exactly
    state = load_file(str(tiny_phi3 / "model.safetensors"))
    ref = state["model.layers.1.mlp.gate_up_proj.weight"].to(torch.bfloat16)
    got = torch.from_numpy(np.array(t["blk.1.ffn_up.weight"].data).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(got.reshape(ref.shape), ref)
    norm = state["model.norm.weight"].float().numpy()
    np.testing.assert_array_equal(t["output_norm.weight"].data, norm)


def test_skips_without_llama_bench(tiny_phi3, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.gguf"
    env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                 if p and not (Path(p) / "llama-bench").exists()))
    monkeypatch.setenv("PATH", env["PATH"])
    assert load_script().main(["--model", str(tiny_phi3), "--out-gguf", str(out), "--type", "f32"]) == 0
    assert "llama-bench not found on PATH: skipped" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    res = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_phi3), "--no-convert"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "llama-bench not found on PATH: skipped" in res.stdout, res.stderr
    assert not list(tiny_phi3.glob("*.gguf"))
