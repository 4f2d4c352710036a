"""Shared test fixtures: paths to ../shared and tiny random checkpoints built from the real configs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
FIXTURES = SHARED / "fixtures" / "phi3v"
PHI35_MINI = REFERENCE / "Phi-3.5-mini-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Phi-3.5-MoE's published sizes (no config file of it is stored in shared/; see shared/reference/README.md).
PHI35_MOE = dict(
    architectures=["PhiMoEForCausalLM"], model_type="phimoe", hidden_size=4096, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, intermediate_size=6400, num_local_experts=16,
    num_experts_per_tok=2, vocab_size=32064, rms_norm_eps=1e-5, attention_bias=True, lm_head_bias=True,
    router_jitter_noise=0.01, input_jitter_noise=0.01, max_position_embeddings=131072,
    original_max_position_embeddings=4096, rope_theta=10000.0, sliding_window=131072, hidden_act="silu",
    bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False,
    router_aux_loss_coef=0.0, output_router_logits=False, torch_dtype="bfloat16",
)
MOE_MSCALE = 1.243163121016122


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_chat_jsonl(path: Path, qa) -> Path:
    """A training file of one-turn chats, one JSON line per (question, answer)."""
    return write_jsonl(path, chat_records(qa))


def chat_records(qa) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]


# No test may reach the network: a repo id that is not in the cache must not start a download (subprocesses too).
os.environ["HF_HUB_OFFLINE"] = "1"


def require_shared():
    if not REFERENCE.is_dir():
        pytest.fail(f"{REFERENCE} is missing: tests need the shared/ folder beside the repository")


@pytest.fixture(scope="session")
def moe_like_dir(tmp_path_factory) -> Path:
    """A folder shaped like Phi-3.5-MoE-instruct: its config (built from the published sizes) + its tokenizer."""
    require_shared()
    d = tmp_path_factory.mktemp("phi35_moe_like")
    base = json.loads((PHI35_MINI / "config.json").read_text())
    cfg = dict(PHI35_MOE)
    cfg["rope_scaling"] = {
        "type": "longrope", "short_factor": base["rope_scaling"]["short_factor"],
        "long_factor": base["rope_scaling"]["long_factor"], "short_mscale": MOE_MSCALE, "long_mscale": MOE_MSCALE,
        "original_max_position_embeddings": 4096,
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        shutil.copyfile(PHI35_MINI / f, d / f)
    return d


def make_tiny(tmp_path_factory, like, name, **sizes) -> Path:
    from phi3v.checkpoint.random import create_random

    return create_random(like, tmp_path_factory.mktemp(name), **sizes)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """Phi-3.5-mini shaped: GQA 6/2, LongRoPE boundary at 64, sliding window 16 (all of them bite)."""
    require_shared()
    return make_tiny(tmp_path_factory, PHI35_MINI, "tiny_phi3", seed=1, std=0.15, layers=2, hidden=96, heads=6,
                     kv_heads=2, intermediate=128, original_max=64, sliding_window=16)


@pytest.fixture(scope="session")
def tiny_phi3_sharded(tmp_path_factory) -> Path:
    require_shared()
    return make_tiny(tmp_path_factory, PHI35_MINI, "tiny_phi3_sharded", seed=2, std=0.15, layers=2, hidden=64,
                     heads=4, intermediate=96, original_max=64, max_shard_bytes=1 << 20)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, moe_like_dir) -> Path:
    """Phi-3.5-MoE shaped: 16 experts top-2, GQA 4/2, LongRoPE with mscale, boundary at 64."""
    return make_tiny(tmp_path_factory, moe_like_dir, "tiny_moe", seed=3, std=0.15, layers=2, hidden=64, heads=4,
                     kv_heads=2, intermediate=96, original_max=64)


@pytest.fixture(scope="session")
def random_ids():
    return torch.randint(0, 32000, (3, 140), generator=torch.Generator().manual_seed(0))
