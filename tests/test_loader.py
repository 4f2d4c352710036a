"""Checkpoint loading: sharded and single files, dtypes, the HF cache, and one clear error per broken checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from phi3v.models import config_from_dict, load_config
from phi3v.errors import CheckpointError
from phi3v.checkpoint.hub import resolve_model_dir
from phi3v.checkpoint.load import load_causal_lm
from phi3v.checkpoint.safetensors import SafetensorsFile, read_state_dict


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_same_as_single(tiny_phi3_sharded, tmp_path):
    shards = sorted(tiny_phi3_sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tiny_phi3_sharded / "model.safetensors.index.json").is_file()
    from safetensors.torch import load_file

    expected = {}
    for f in shards:
        expected.update(load_file(f))
    state = read_state_dict(tiny_phi3_sharded)
    assert state.keys() == expected.keys()
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(tiny_phi3, dtype, random_ids):
    model = load_causal_lm(tiny_phi3, load_config(tiny_phi3), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref = load_causal_lm(tiny_phi3, load_config(tiny_phi3), torch.float32)
    with torch.no_grad():
        a, b = model(random_ids[:1, :20]).float(), ref(random_ids[:1, :20])
    tol = 0 if dtype == torch.float32 else 0.15 * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol


def test_weights_in_their_own_dtype_are_not_copied(tiny_phi3):
    """Loading in the checkpoint's dtype assigns the memory-mapped tensors themselves."""
    from phi3v.checkpoint.load import load_into
    from phi3v.models.layers import CausalLM

    cfg = load_config(tiny_phi3)
    state = read_state_dict(tiny_phi3)
    with torch.device("meta"):
        model = CausalLM(cfg)
    load_into(model, state, torch.bfloat16, tiny_phi3)
    emb = model.model.embed_tokens.weight
    assert emb.dtype == torch.bfloat16 and emb.data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_missing_shard(tiny_phi3_sharded, tmp_path):
    d = copy(tiny_phi3_sharded, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} .* is missing"):
        load_causal_lm(d, load_config(d))


def test_truncated_file(tiny_phi3, tmp_path):
    d = copy(tiny_phi3, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_causal_lm(d, load_config(d))


def test_not_a_safetensors_file(tiny_phi3, tmp_path):
    d = copy(tiny_phi3, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_causal_lm(d, load_config(d))


def test_wrong_shape(tiny_phi3, tmp_path):
    d = copy(tiny_phi3, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_up_proj\.weight .* has shape \(256, 96\) but config\.json implies \(200, 96\)"):
        load_causal_lm(d, load_config(d))


def test_missing_weight(tiny_phi3, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy(tiny_phi3, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. model\.layers\.1\.mlp\.down_proj\.weight\)"):
        load_causal_lm(d, load_config(d))


def test_no_weights(tiny_phi3, tmp_path):
    d = copy(tiny_phi3, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_causal_lm(d, load_config(d))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_config(tmp_path)


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_config(tmp_path)


def test_missing_tokenizer(tiny_phi3, tmp_path):
    from phi3v.api import load

    d = copy(tiny_phi3, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load(d)


def test_unknown_architecture():
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['LlamaForCausalLM'\]"):
        config_from_dict({"architectures": ["LlamaForCausalLM"]})


def test_unknown_rope_type(tiny_phi3):
    cfg = json.loads((tiny_phi3 / "config.json").read_text())
    cfg["rope_scaling"]["type"] = "yarn"
    with pytest.raises(CheckpointError, match="unsupported rope scaling type 'yarn'"):
        config_from_dict(cfg)


def test_both_moe_architecture_spellings(tiny_moe):
    cfg = json.loads((tiny_moe / "config.json").read_text())
    for arch in ("PhiMoEForCausalLM", "PhimoeForCausalLM"):
        cfg["architectures"] = [arch]
        assert type(config_from_dict(cfg)).__name__ == "PhiMoEConfig"


def test_repo_id_from_local_hf_cache(tiny_phi3, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--microsoft--Phi-3.5-mini-instruct" / "snapshots" / "abc123"
    shutil.copytree(tiny_phi3, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("microsoft/Phi-3.5-mini-instruct") == snap
    with pytest.raises(CheckpointError, match="not a local folder nor in the Hugging Face cache"):
        resolve_model_dir("microsoft/Phi-3-medium-4k-instruct")


def test_repo_id_not_in_the_cache_is_downloaded_unless_offline(tiny_phi3, tmp_path, monkeypatch):
    """With the network allowed, a missing repo id goes to huggingface_hub's snapshot_download (into the cache, only
    the checkpoint's files); offline (HF_HUB_OFFLINE=1) or when the download fails, the error says why."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, cache_dir, allow_patterns):  # what the hub would leave in the cache
        calls.append((repo_id, Path(cache_dir), allow_patterns))
        snap = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "f00d"
        shutil.copytree(tiny_phi3, snap)
        return str(snap)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set, so it was not downloaded"):
        resolve_model_dir("microsoft/Phi-3.5-vision-instruct")  # the suite runs offline (conftest)
    assert calls == []

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    got = resolve_model_dir("microsoft/Phi-3.5-vision-instruct")
    assert got == tmp_path / "hub" / "models--microsoft--Phi-3.5-vision-instruct" / "snapshots" / "f00d"
    assert calls == [("microsoft/Phi-3.5-vision-instruct", tmp_path / "hub",
                      ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"])]
    assert resolve_model_dir("microsoft/Phi-3.5-vision-instruct") == got and len(calls) == 1  # now from the cache

    def no_network(*a, **kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match=r"downloading it failed \(OSError: Network is unreachable\)"):
        resolve_model_dir("microsoft/Phi-3-mini-4k-instruct")


def test_saved_files_are_standard_and_64_byte_aligned(tmp_path):
    """Our writer's files load with the safetensors library; tensors of a 64-multiple size map 64-aligned."""
    from safetensors.torch import load_file

    from phi3v.checkpoint.safetensors import save_file

    t = {"b": torch.randn(3, 5).bfloat16(), "w": torch.randint(-5, 5, (64, 128), dtype=torch.int8),
         "scalar": torch.tensor(2.0), "empty": torch.zeros(0), "a": torch.arange(6, dtype=torch.int64)}
    save_file(t, tmp_path / "x.safetensors", {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    st = SafetensorsFile(tmp_path / "x.safetensors")
    assert st.get("w").data_ptr() % 64 == 0 and torch.equal(st.get("w"), t["w"])
