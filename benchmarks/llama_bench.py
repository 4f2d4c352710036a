"""Convert a phi3v Phi-3 / Phi-3.5-mini text checkpoint to GGUF (llama.cpp's "phi3" architecture) and, when a
llama.cpp build is on PATH, run `llama-bench` on it beside `phi3v bench` on the same model and print the ratio.

    python benchmarks/llama_bench.py --model DIR [--out-gguf PATH] [--type bf16|f32]
                                     [--prompt-tokens 128] [--new-tokens 64] [--threads 2] [--no-convert]

The GGUF is written with the `gguf` package (llama.cpp's own writer, `pip install gguf`), following the
conventions of llama.cpp's convert_hf_to_gguf.py for Phi3ForCausalLM: fused attn_qkv and ffn_up (gate|up,
2*I rows), f32 norms, LongRoPE factors as rope_factors_long / rope_factors_short and the LongRoPE attention
factor as rope.scaling.attn_factor. Without llama-bench on PATH the script says so on one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SKIP_MESSAGE = "llama-bench not found on PATH: skipped the llama.cpp comparison"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def load_state(model_dir: Path):
    """Yield (name, torch tensor) for every tensor of the checkpoint's safetensors file(s)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir}: no *.safetensors file")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def rope_params(cfg: dict) -> tuple[int, float | None, list[float] | None, list[float] | None]:
    """(rope dims, attn factor, long factors, short factors) as convert_hf_to_gguf.py's Phi3MiniModel derives them."""
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    rope_dims = int(cfg.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    rs = cfg.get("rope_scaling")
    if not rs:
        return rope_dims, None, None, None
    kind = (rs.get("rope_type") or rs.get("type") or "").lower()
    max_pos = cfg["max_position_embeddings"]
    orig = cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings") or max_pos
    scale = max_pos / orig
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise SystemExit(f"rope_scaling type {kind!r} is not supported by llama.cpp's phi3 conversion")
    long_f, short_f = rs.get("long_factor"), rs.get("short_factor")
    if long_f is None or short_f is None or len(long_f) != len(short_f) or len(long_f) != rope_dims // 2:
        raise SystemExit(f"rope long/short factors must both have {rope_dims // 2} entries")
    return rope_dims, attn, [float(x) for x in long_f], [float(x) for x in short_f]


def vocab(model_dir: Path, n_vocab: int):
    """Tokens, scores and token types for llama.cpp's "llama" (SentencePiece) tokenizer, from tokenizer.json."""
    import gguf

    tj = read_json(model_dir / "tokenizer.json")
    model = tj["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback", False):
        raise SystemExit("tokenizer.json is not a Llama-style BPE tokenizer with byte fallback")
    tokens: list[bytes | None] = [None] * n_vocab
    scores = [0.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    # llama.cpp's SPM tokenizer merges the adjacent pair whose result scores highest; HF's BPE the pair of the
    # lowest merge rank: score = -rank makes them agree. Tokens no merge produces (bytes, single characters)
    # score below every merged one.
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    n_merges = len(model.get("merges", []))
    for text, i in model["vocab"].items():
        if i >= n_vocab:
            continue
        tokens[i] = text.encode("utf-8")
        scores[i] = -float(rank.get(text, n_merges + i))
        types[i] = int(gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else gguf.TokenType.NORMAL)
    unk = model.get("unk_token")
    for t in tj.get("added_tokens", []):
        i, text = t["id"], t["content"]
        if i >= n_vocab:
            continue
        tokens[i] = text.encode("utf-8")
        scores[i] = 0.0
        if text == unk:
            types[i] = int(gguf.TokenType.UNKNOWN)
        elif t.get("special") or text in ("<s>", "</s>"):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            types[i] = int(gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):  # the embedding's padding rows past the tokenizer
        if t is None:
            tokens[i] = f"[PAD{i}]".encode()
            types[i] = int(gguf.TokenType.UNUSED)
    return tokens, scores, types


def convert(model_dir: str | Path, out: str | Path, out_type: str = "bf16") -> Path:
    """Write `model_dir` (a Phi3ForCausalLM checkpoint) as a GGUF file at `out`; return its path."""
    import gguf
    import torch

    model_dir, out = Path(model_dir), Path(out)
    cfg = read_json(model_dir / "config.json")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "phi3" or "Phi3ForCausalLM" not in archs:
        got = archs or cfg.get("model_type")
        raise SystemExit(f"{model_dir}: only Phi3ForCausalLM text checkpoints convert (got {got})")
    L, n_vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    rope_dims, attn_factor, long_f, short_f = rope_params(cfg)

    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3])
    w.add_name(model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(L)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if out_type == "bf16" else gguf.LlamaFileType.ALL_F32)
    w.add_sliding_window(cfg.get("sliding_window") or 0)  # 0 is how llama.cpp tells Phi-4 (no window) apart
    if attn_factor is not None:
        w.add_rope_scaling_attn_factors(attn_factor)

    tokens, scores, types = vocab(model_dir, n_vocab)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    tc = read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").exists() else {}
    tok_ids = {t.decode("utf-8", "replace"): i for i, t in enumerate(tokens)}

    def tok_id(key: str, fallback):
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return tok_ids.get(v, fallback) if v is not None else fallback

    w.add_bos_token_id(tok_id("bos_token", cfg.get("bos_token_id", 1)))
    w.add_eos_token_id(tok_id("eos_token", cfg.get("eos_token_id", 2)))
    w.add_unk_token_id(tok_id("unk_token", 0))
    pad = tok_id("pad_token", cfg.get("pad_token_id"))
    if pad is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(bool(tc.get("add_bos_token", True)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")

    def add(name: str, t: torch.Tensor):
        if t.ndim == 1 or out_type == "f32":  # norms and factors stay f32, as llama.cpp's converter keeps them
            w.add_tensor(name, t.to(torch.float32).contiguous().numpy())
        else:
            arr = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            w.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.BF16)

    if long_f is not None:
        add("rope_factors_long.weight", torch.tensor(long_f, dtype=torch.float32))
        add("rope_factors_short.weight", torch.tensor(short_f, dtype=torch.float32))
    for name, t in load_state(model_dir):
        if name in names:
            gname = names[name]
        elif (m := layer_re.fullmatch(name)) and m.group(2) in per_layer:
            gname = f"blk.{m.group(1)}.{per_layer[m.group(2)]}.weight"
        else:
            raise SystemExit(f"{model_dir}: unexpected tensor {name} (not a Phi-3 text checkpoint?)")
        add(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_llama_bench(exe: str, gguf_path: Path, p: int, n: int, threads: int) -> dict:
    cmd = [exe, "-m", str(gguf_path), "-p", str(p), "-n", str(n), "-t", str(threads), "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"llama-bench failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    rows = json.loads(res.stdout)
    out = {}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out["prefill_tok_s"] = r["avg_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_tok_s"] = r["avg_ts"]
    return out


def run_phi3v_bench(model_dir: Path, p: int, n: int, threads: int, dtype: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "phi3v.cli", "bench", "--model", str(model_dir), "--prompt-tokens", str(p),
           "--new-tokens", str(n), "--dtype", dtype, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"phi3v bench failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["phi3v"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a phi3v Phi-3 / Phi-3.5-mini text checkpoint folder")
    ap.add_argument("--out-gguf", default=None, help="where to write the GGUF (default: MODEL/model-TYPE.gguf)")
    ap.add_argument("--type", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-convert", action="store_true", help="use an existing --out-gguf / skip writing it")
    args = ap.parse_args(argv)

    model_dir = Path(args.model)
    out = Path(args.out_gguf) if args.out_gguf else model_dir / f"model-{args.type}.gguf"
    exe = shutil.which("llama-bench")
    if exe is None and args.no_convert:
        print(f"{SKIP_MESSAGE} (nothing converted: --no-convert)")
        return 0
    if not args.no_convert:
        convert(model_dir, out, args.type)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    elif not out.exists():
        raise SystemExit(f"--no-convert: {out} does not exist")
    if exe is None:
        print(f"{SKIP_MESSAGE} (GGUF at {out})")
        return 0

    dtype = "bfloat16" if args.type == "bf16" else "float32"
    llama = run_llama_bench(exe, out, args.prompt_tokens, args.new_tokens, args.threads)
    ours = run_phi3v_bench(model_dir, args.prompt_tokens, args.new_tokens, args.threads, dtype)
    print(f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, {args.threads} threads, {args.type}")
    print(f"{'':12}{'prefill tok/s':>14}{'decode tok/s':>14}")
    print(f"{'phi3v':12}{ours['prefill_tok_s']:14.1f}{ours['decode_tok_s']:14.2f}")
    nan = float("nan")
    print(f"{'llama.cpp':12}{llama.get('prefill_tok_s', nan):14.1f}{llama.get('decode_tok_s', nan):14.2f}")
    ratio = {k: ours[k] / llama[k] for k in ("prefill_tok_s", "decode_tok_s") if llama.get(k)}
    print("phi3v / llama.cpp: prefill {:.2f}x, decode {:.2f}x".format(
        ratio.get("prefill_tok_s", float("nan")), ratio.get("decode_tok_s", float("nan"))))
    print(json.dumps({"phi3v": ours, "llama.cpp": llama, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
