"""phi3v against llama.cpp on the same Phi-3 / Phi-3.5-mini text checkpoint, at every bit width, in one run:
bf16 / Q8_0 / Q4_0 GGUFs through `llama-bench` beside `phi3v bench` in bf16 / int8 / int4 (group 128), with
interleaved repetitions (one llama.cpp run and one phi3v run per width per repetition, the order alternating, so
that whatever else the machine is doing hits both sides), medians, the ratio of the medians and the median of each
repetition's own ratio (its two runs are neighbours in time: on a VM whose memory bandwidth drifts, the steadier
figure), the CPU's flags and the decode bandwidth limit (weight bytes read per token / the measured read bandwidth).

    python benchmarks/build_llama_cpp.py        # once: llama-bench and llama-quantize into ~/.cache/phi3v/llama.cpp
    python benchmarks/llama_bench.py --model DIR [--widths bf16,int8,int4] [--reps 3] [--prompt-tokens 128]
                                     [--new-tokens 64] [--threads 2] [--gguf-dir DIR]

The bf16 GGUF is written with the `gguf` package (llama.cpp's own writer, `pip install gguf`), following the
conventions of llama.cpp's convert_hf_to_gguf.py for Phi3ForCausalLM: fused attn_qkv and ffn_up (gate|up,
2*I rows), f32 norms, LongRoPE factors as rope_factors_long / rope_factors_short and the LongRoPE attention
factor as rope.scaling.attn_factor; Q8_0 and Q4_0 are made from it by `llama-quantize` (its defaults: Q4_0 keeps
the output matrix at Q6_K). Without llama-bench (neither built nor on PATH) the script says so and exits 0.
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
import time
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


WIDTHS = {"bf16": ("BF16", None), "int8": ("Q8_0", "int8"), "int4": ("Q4_0", "int4")}  # ours: (GGUF type, --quantize)
BYTES_PER_WEIGHT = {"bf16": (2.0, 2.0), "int8": (1 + 2 / 3072, 34 / 32), "int4": (0.5 + 4 / 128, 18 / 32)}  # phi3v, GGUF
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
             "asimd", "sve")


def cpu_summary() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    lacks = [f for f in CPU_FLAGS if f not in flags]
    return f"{name}, {os.cpu_count()} cores; has {' '.join(have) or '-'}; lacks {' '.join(lacks) or '-'}"


def read_bandwidth_gb_s(threads: int, mib: int = 1024, reps: int = 5) -> float:
    """Best of `reps` sums over a buffer much larger than the caches: the read bandwidth decode can hope for."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def decode_weights(model_dir: Path) -> int:
    """Weights read per decoded token: every linear of the decoder and lm_head (not the embedding table)."""
    cfg = read_json(model_dir / "config.json")
    C, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = C // cfg["num_attention_heads"]
    return L * (C * (C + 2 * kv * hd) + C * C + 2 * I * C + I * C) + V * C


def find_llama_tools() -> dict[str, str] | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build_llama_cpp import find_tools

    return find_tools()


def ggufs(model_dir: Path, out_dir: Path, widths, quantize_exe: str) -> dict[str, Path]:
    """The bf16 GGUF (converted once) and its Q8_0 / Q4_0 quantizations, cached in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bf16 = out_dir / f"{model_dir.name}-BF16.gguf"
    if not bf16.exists():
        convert(model_dir, bf16, "bf16")
    paths = {}
    for w in widths:
        kind = WIDTHS[w][0]
        path = out_dir / f"{model_dir.name}-{kind}.gguf"
        if not path.exists():
            subprocess.run([quantize_exe, str(bf16), str(path), kind], check=True, capture_output=True)
        paths[w] = path
    return paths


def run_llama_bench(exe: str, gguf_path: Path, p: int, n: int, threads: int) -> dict:
    cmd = [exe, "-m", str(gguf_path), "-p", str(p), "-n", str(n), "-t", str(threads), "-r", "1", "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"llama-bench failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    out = {}
    for r in json.loads(res.stdout):
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out["prefill_tok_s"] = r["avg_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_tok_s"] = r["avg_ts"]
    return out


def run_phi3v_bench(model_dir: Path, p: int, n: int, threads: int, quantize: str | None,
                    dtype: str = "bfloat16") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "phi3v.cli", "bench", "--model", str(model_dir), "--prompt-tokens", str(p),
           "--new-tokens", str(n), "--dtype", dtype, "--json"] + (["--quantize", quantize] if quantize else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"phi3v bench failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["phi3v"]


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def single(args) -> int:
    """The one-width mode (--out-gguf / --type / --no-convert): convert, then compare if llama-bench is on PATH."""
    model_dir, kind = Path(args.model), args.type or "bf16"
    out = Path(args.out_gguf) if args.out_gguf else model_dir / f"model-{kind}.gguf"
    exe = shutil.which("llama-bench")
    if exe is None and args.no_convert:
        print(f"{SKIP_MESSAGE} (nothing converted: --no-convert)")
        return 0
    if not args.no_convert:
        convert(model_dir, out, kind)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {kind})")
    elif not out.exists():
        raise SystemExit(f"--no-convert: {out} does not exist")
    if exe is None:
        print(f"{SKIP_MESSAGE} (GGUF at {out})")
        return 0
    llama = run_llama_bench(exe, out, args.prompt_tokens, args.new_tokens, args.threads)
    ours = run_phi3v_bench(model_dir, args.prompt_tokens, args.new_tokens, args.threads, None,
                           "bfloat16" if kind == "bf16" else "float32")
    ratio = {k: ours[k] / llama[k] for k in ("prefill_tok_s", "decode_tok_s") if llama.get(k)}
    print(f"phi3v {ours['prefill_tok_s']:.1f} / {ours['decode_tok_s']:.2f}, llama.cpp {llama}, ratio {ratio}")
    print(json.dumps({"phi3v": ours, "llama.cpp": llama, "ratio": ratio}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a phi3v Phi-3 / Phi-3.5-mini text checkpoint folder")
    ap.add_argument("--gguf-dir", default=None, help="where the GGUFs are cached (default: MODEL/gguf)")
    ap.add_argument("--widths", default="bf16,int8,int4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-gguf", default=None, help="one-width mode: write the GGUF here (default MODEL/model-TYPE.gguf)")
    ap.add_argument("--type", choices=["bf16", "f32"], default=None, help="one-width mode: the GGUF's float type")
    ap.add_argument("--no-convert", action="store_true", help="one-width mode: use an existing --out-gguf")
    args = ap.parse_args(argv)
    if args.out_gguf or args.type or args.no_convert:
        return single(args)
    widths = [w for w in args.widths.split(",") if w]
    if unknown := [w for w in widths if w not in WIDTHS]:
        raise SystemExit(f"unknown width(s) {unknown}: use {', '.join(WIDTHS)}")
    model_dir = Path(args.model)
    tools = find_llama_tools()
    if tools is None:
        print(f"{SKIP_MESSAGE} (build it with: python benchmarks/build_llama_cpp.py)")
        return 0
    paths = ggufs(model_dir, Path(args.gguf_dir) if args.gguf_dir else model_dir / "gguf", widths,
                  tools["llama-quantize"])
    print(f"CPU: {cpu_summary()}")
    print(f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.reps} interleaved repetitions (llama.cpp then phi3v, per width)", flush=True)
    bw = [read_bandwidth_gb_s(args.threads)]
    runs = {(side, w): [] for w in widths for side in ("llama.cpp", "phi3v")}
    for rep in range(args.reps):
        for w in widths:
            sides = {"llama.cpp": lambda: run_llama_bench(tools["llama-bench"], paths[w], args.prompt_tokens,
                                                          args.new_tokens, args.threads),
                     "phi3v": lambda: run_phi3v_bench(model_dir, args.prompt_tokens, args.new_tokens, args.threads,
                                                      WIDTHS[w][1])}
            for side in (("llama.cpp", "phi3v") if rep % 2 == 0 else ("phi3v", "llama.cpp")):  # alternate who goes first
                runs[side, w].append(sides[side]())
            print(f"  rep {rep + 1} {w}: llama.cpp {runs['llama.cpp', w][-1]}, phi3v "
                  f"{ {k: round(v, 2) for k, v in runs['phi3v', w][-1].items() if k.endswith('tok_s')} }", flush=True)
    bw.append(read_bandwidth_gb_s(args.threads))
    n_w = decode_weights(model_dir)
    print(f"read bandwidth {bw[0]:.1f} GB/s before, {bw[1]:.1f} GB/s after; {n_w / 1e9:.2f} G weights read per token")
    print(f"{'width':7}{'llama.cpp pp/tg tok/s':>24}{'phi3v pp/tg tok/s':>22}{'ratio pp/tg':>14}"
          f"{'per rep pp/tg':>16}{'tg limit (ours/GGUF)':>22}")
    summary = {}
    for w in widths:
        med = {side: {k: median([r[k] for r in runs[side, w] if k in r]) for k in ("prefill_tok_s", "decode_tok_s")}
               for side in ("llama.cpp", "phi3v")}
        ratio = {k: med["phi3v"][k] / med["llama.cpp"][k] for k in med["phi3v"]}
        # each repetition's own ratio (its two runs are neighbours in time, so slow drifts of the machine's speed
        # cancel), the median over repetitions
        per_rep = {k: median([p[k] / q[k] for q, p in zip(runs["llama.cpp", w], runs["phi3v", w])
                              if k in p and k in q]) for k in ("prefill_tok_s", "decode_tok_s")}
        limit = [max(bw) * 1e9 / (n_w * b) for b in BYTES_PER_WEIGHT[w]]
        summary[w] = {"median": med, "ratio": ratio, "ratio_per_rep": per_rep, "decode_limit_tok_s": limit, "runs": {
            side: runs[side, w] for side in ("llama.cpp", "phi3v")}}
        lm, ph = med["llama.cpp"], med["phi3v"]
        print(f"{w + '/' + WIDTHS[w][0]:7}{lm['prefill_tok_s']:>15.1f} /{lm['decode_tok_s']:>6.2f}"
              f"{ph['prefill_tok_s']:>14.1f} /{ph['decode_tok_s']:>6.2f}"
              f"{ratio['prefill_tok_s']:>8.2f} /{ratio['decode_tok_s']:>5.2f}"
              f"{per_rep['prefill_tok_s']:>10.2f} /{per_rep['decode_tok_s']:>5.2f}{limit[0]:>13.1f} /{limit[1]:>6.1f}")
    print(json.dumps({"cpu": cpu_summary(), "bandwidth_gb_s": bw, "widths": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
