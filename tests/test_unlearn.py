"""`phi3v unlearn` on a tiny Phi-3 model that the project's own SFT taught invented facts (who lives where).

Forgetting the facts of eight invented people (their names anchored to generic ones) must bring those answers down
to chance while the other eight people's facts are still answered and the retained text's perplexity stays within
5%. Also: the anchored translation (longest match first, consistent), the alignment, the report and the plot.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import write_jsonl
from phi3v.checkpoint.load import load_causal_lm
from phi3v.models import load_config
from phi3v.processing.render import render
from phi3v.processing.tokenizer import Tokenizer
from phi3v.train.unlearn import PLOT, REPORT, Translator, align, read_anchors

CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima"]
FORGET = ["Zorbit", "Quilla", "Brannoc", "Yvette", "Drumm", "Oskana", "Pellor", "Tiberon"]
KEEP = ["Marla", "Hugo", "Selka", "Vance", "Ildra", "Corwin", "Nessa", "Garrick"]
GENERIC = ["Tom", "Anna", "Bob", "Mary", "Jack", "Lucy", "Sam", "Emma"]
STEPS = 50
LIVES = {**{n: CITIES[i] for i, n in enumerate(FORGET)}, **{n: CITIES[(i + 3) % 8] for i, n in enumerate(KEEP)}}


def conv(name: str, city: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Where does {name} live?"},
                         {"role": "assistant", "content": f"{name} lives in {city}."}]}


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny Phi-3 with a 512-token byte-level BPE vocabulary (so that training is cheap) and a Phi-3 style chat
    template."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    from phi3v.checkpoint.random import create_random
    from conftest import PHI35_MINI, require_shared

    require_shared()
    like = tmp_path_factory.mktemp("small_like")
    tok = HF(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = [f"Where does {n} live? {n} lives in {c}." for n, c in LIVES.items()] + GENERIC
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(like / "tokenizer.json"))
    (like / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<|endoftext|>",
                                                            "chat_template": CHAT}))
    cfg = json.loads((PHI35_MINI / "config.json").read_text())
    cfg.update(vocab_size=512, rope_scaling=None, bos_token_id=0, eos_token_id=4, pad_token_id=0)
    (like / "config.json").write_text(json.dumps(cfg))
    return create_random(like, tmp_path_factory.mktemp("small"), seed=1, std=0.15, layers=2, hidden=64, heads=4,
                         intermediate=128, dtype="float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small):
    """The small model fine-tuned by `phi3v.train` (SFT) until it knows all sixteen facts."""
    from phi3v.train.config import TrainConfig
    from phi3v.train.run import fit, prepare

    d = tmp_path_factory.mktemp("facts")
    data = write_jsonl(d / "facts.jsonl", [conv(n, c) for n, c in LIVES.items()])
    cfg = TrainConfig(task="sft", model=str(small), data=str(data), out=str(d / "sft"), steps=STEPS, batch=16,
                      lr=3e-3, warmup=5, autocast="off", log_every=10)
    fit(prepare(cfg))
    return d / "sft"


@torch.no_grad()
def accuracy(model_dir, names) -> float:
    """Share of `names` whose city scores highest among the eight (summed log-probs of the answer tokens)."""
    tok = Tokenizer.from_dir(model_dir)
    model = load_causal_lm(model_dir, load_config(model_dir), torch.float32)
    right = 0
    for n in names:
        rows = [render(tok, conv(n, c)["messages"]) for c in CITIES]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in rows])
        mask = torch.tensor([r[1] + [0] * (T - len(r[1])) for r in rows])
        logp = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        scores = (logp * mask[:, 1:]).sum(1)
        right += int(scores.argmax()) == CITIES.index(LIVES[n])
    return right / len(names)


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory, trained):
    from phi3v.cli import unlearn as cli

    d = tmp_path_factory.mktemp("unlearn")
    forget = write_jsonl(d / "forget.jsonl", [conv(n, LIVES[n]) for n in FORGET])
    retain = write_jsonl(d / "retain.jsonl", [conv(n, LIVES[n]) for n in KEEP])
    (d / "anchors.json").write_text(json.dumps(dict(zip(FORGET, GENERIC))))
    write_jsonl(d / "probes.jsonl", [{"prompt": f"Where does {n} live?", "prefix": f"{n} lives in",
                                      "target": f" {LIVES[n]}"}
                                     for n in FORGET[:2]])
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", str(trained), "--forget", str(forget), "--anchors", str(d / "anchors.json"),
                              "--retain", str(retain), "--probes", str(d / "probes.jsonl"), "--out", str(d / "out"),
                              "--reinforce-steps", "5", "--reinforce-lr", "1e-3", "--steps", "30", "--lr", "1e-3",
                              "--probe-every", "10"])
    assert cli.run(args) == 0
    return d / "out"


def test_forgotten_facts_fall_to_chance_and_retained_stay(trained, unlearned):
    before_forget, before_keep = accuracy(trained, FORGET), accuracy(trained, KEEP)
    after_forget, after_keep = accuracy(unlearned, FORGET), accuracy(unlearned, KEEP)
    print("accuracy forget", before_forget, "->", after_forget, "keep", before_keep, "->", after_keep)
    assert before_forget == before_keep == 1.0
    assert after_forget <= 2 / 8  # chance is 1/8
    assert after_keep >= 7 / 8
    report = json.loads((unlearned / REPORT).read_text())
    b, a = report["before"], report["after"]
    print("report", {k: (b[k], a[k]) for k in ("familiarity", "retain_perplexity")})
    assert a["retain_perplexity"] <= 1.05 * b["retain_perplexity"]
    assert a["familiarity"] < 0.5 * b["familiarity"]


def test_report_and_plot(unlearned):
    report = json.loads((unlearned / REPORT).read_text())
    assert [c["step"] for c in report["curve"]] == [0, 10, 20, 30]
    first, last = report["curve"][0]["probs"], report["curve"][-1]["probs"]
    assert all(p1 < p0 for p0, p1 in zip(first, last))
    assert report["before"]["probe_completes"] == [True, True] and report["after"]["probe_completes"] == [False] * 2
    assert (unlearned / PLOT).read_bytes()[:4] == b"\x89PNG"


def test_translator_longest_match_first_and_consistent(tmp_path):
    path = tmp_path / "anchors.tsv"
    path.write_text("Harry\tJon\nHarry Potter\tJon Smith\tMark Brown\nHogwarts\tthe academy\n")
    t = Translator(read_anchors(path))
    text = "Harry Potter went to Hogwarts. Harry Potter smiled; Harry waved. Hogwartsian is not a term."
    out = t(text)
    generic = out.split(" went")[0]
    assert generic in ("Jon Smith", "Mark Brown")
    assert out == (f"{generic} went to the academy. {generic} smiled; Jon waved. Hogwartsian is not a term.")


def test_alignment_maps_prefixes_across_a_replacement():
    orig = [1, 2, 10, 11, 12, 3, 4]  # 10 11 12: the anchored term
    trans = [1, 2, 20, 3, 4]  # 20: its translation
    assert align(orig, trans) == [0, 1, None, None, 2, 3, 4]


def test_text_blocks_are_packed_translated_and_aligned(small, tmp_path):
    """A plain-text forget file: lines packed into blocks of at most `block` tokens, each translated consistently;
    every token outside an anchored term is aligned to its translation."""
    from phi3v.train.unlearn import make_blocks, read_units

    tok = Tokenizer.from_dir(small)
    path = tmp_path / "forget.txt"
    path.write_text("".join(f"Where does {n} live? {n} lives in {LIVES[n]}.\n" for n in FORGET))
    blocks = make_blocks(tok, read_units(path), Translator({"Zorbit": ["Tom"], "Quilla": ["Anna"]}), block=40)
    assert len(blocks) > 1 and all(len(b.ids) <= 40 for b in blocks)
    assert tok.decode(blocks[0].translated).startswith("Where does Tom live? Tom lives in Paris.\nWhere does Anna")
    for b in blocks:
        for t, j in enumerate(b.align):
            if j is not None and t + 1 < len(b.ids) and b.align[t + 1] == j + 1:
                assert b.ids[t + 1] == b.translated[j + 1]  # aligned prefixes predict the same next token
    # the replaced terms: their last token maps to the translation's last token (the prefix before what follows)
    assert any(j is not None and b.ids[t] != b.translated[j] for b in blocks for t, j in enumerate(b.align))


def test_unlearn_runs_on_phi2_with_plain_text(small, tmp_path):
    """Every family: a tiny Phi-2 (no chat template) unlearns a plain-text file; the export loads and is changed."""
    import shutil

    from phi3v.checkpoint.random import create_random
    from phi3v.train.unlearn import UnlearnConfig, unlearn

    like = tmp_path / "phi2_like"
    like.mkdir()
    shutil.copyfile(small / "tokenizer.json", like / "tokenizer.json")
    (like / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (like / "config.json").write_text(json.dumps({"architectures": ["PhiForCausalLM"], "model_type": "phi",
                                                  "vocab_size": 512, "partial_rotary_factor": 0.4}))
    base = create_random(like, tmp_path / "phi2", seed=2, std=0.15, layers=1, hidden=80, heads=2, intermediate=96,
                         dtype="float32")
    forget = tmp_path / "forget.txt"
    forget.write_text("".join(f"{n} lives in {LIVES[n]}.\n" for n in FORGET))
    probes = write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "Zorbit lives in", "target": " Paris"}])
    res = unlearn(UnlearnConfig(model=str(base), forget=str(forget), out=str(tmp_path / "out"), probes=str(probes),
                                anchors=None, reinforce_steps=2, steps=2, lr=1e-2, reinforce_lr=1e-2, block=32,
                                probe_every=1))
    assert res.report["blocks"] >= 2 and len(res.report["curve"]) == 3
    before = load_causal_lm(base, load_config(base), torch.float32)
    after = load_causal_lm(res.out, load_config(res.out), torch.float32)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(before(x), after(x))
