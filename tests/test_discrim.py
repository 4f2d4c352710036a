"""`phi3v eval --task discrim`: the discrim-eval layout, p(yes) from the yes/no logits, and the mixed-effects scores.

A small file in the published layout is written here; on synthetic p(yes) with planted effects the fitted
coefficients recover them within their intervals; the normalised p(yes) equals the softmax over the yes/no logits.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from phi3v.errors import InputError
from phi3v.eval import discrim as D

RACES = ["white", "Black", "Asian", "Hispanic", "Native American"]
GENDERS = ["male", "female", "non-binary"]
AGES = [20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
SOME_AGES = [20.0, 60.0, 100.0]  # the file the model reads: every race and gender, three ages
PLANTED = {"race=Black": 0.6, "race=Asian": -0.4, "race=Hispanic": 0.3, "race=Native American": 0.0,
           "gender=female": 0.5, "gender=non-binary": -0.2, **{f"age={a:g}": -0.01 * (a - 60) for a in AGES if a != 60}}


def rows_of(questions: int, fill_types=("explicit",), ages=AGES):
    for q in range(questions):
        for fill in fill_types:
            for a in ages:
                for g in GENDERS:
                    for r in RACES:
                        text = (f"The applicant is a {a:g}-year-old {r} {g}. Question {q}: should the application be "
                                "approved?" if fill == "explicit" else f"Applicant {q} ({a:g}, {g}, {r}) applies.")
                        yield {"filled_template": text, "decision_question_id": q, "age": a, "gender": g, "race": r,
                               "fill_type": fill}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("discrim") / "explicit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of(2, ("explicit", "implicit"), SOME_AGES)))
    return path


def test_planted_effects_are_recovered_within_their_intervals():
    rng = np.random.default_rng(0)
    intercepts = rng.normal(0, 1, 30)  # per decision question: the random effect
    rows = []
    for r in rows_of(30):
        y = intercepts[r["decision_question_id"]] + 0.2 + sum(
            PLANTED.get(f"{a}={D._value(a, r[a])}", 0.0) for a in D.ATTRIBUTES) + rng.normal(0, 0.3)
        rows.append({**{k: r[k] for k in ("age", "gender", "race", "fill_type")}, "question_id":
                     r["decision_question_id"], "intervention": "none", "p_yes": 1 / (1 + math.exp(-y))})
    # 14 coefficients: each 95% interval misses its truth 1 time in 20, so check the 99.9% ones (and the widths)
    scores = D.fit_mixed(rows, level=0.999)
    assert set(scores) == set(PLANTED) | {"intercept", "converged", "warnings"} and scores["converged"]
    for name, truth in PLANTED.items():
        s = scores[name]
        assert s["low"] <= truth <= s["high"] and s["high"] - s["low"] < 0.2, (name, truth, s)
    assert abs(scores["intercept"]["estimate"] - (0.2 + intercepts.mean())) < 0.5


def test_loader_reads_the_layout_and_rejects_others(data, tmp_path):
    items = D.load_discrim(data)
    assert len(items) == 2 * 2 * 3 * 3 * 5 and items[0].question_id == 0 and items[0].age == 20.0
    assert {i.fill_type for i in items} == {"explicit", "implicit"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"filled_template": "x", "age": 30}) + "\n")
    with pytest.raises(InputError, match="decision_question_id"):
        D.load_discrim(bad)


@pytest.fixture(scope="module")
def model(tiny_phi3):
    import phi3v

    return phi3v.load(tiny_phi3, dtype="float32")


def test_p_yes_is_the_softmax_over_the_yes_no_logits(model, data):
    items = D.load_discrim(data)[:3]
    rows = D.score(model, items, ["none", "illegal"], batch=4)
    yes, no = D.answer_ids(model.tokenizer)
    assert model.tokenizer.decode([yes]).strip() == "yes" and model.tokenizer.decode([no]).strip() == "no"
    for row, (it, iv) in zip(rows, [(i, v) for v in ("none", "illegal") for i in items]):
        ids = D.prompt_ids(model.tokenizer, it, iv, chat=True)
        assert model.tokenizer.decode(ids).endswith('my answer would be "')
        with torch.no_grad():
            logits = model.model(torch.tensor([ids]))[0, -1]
        want = math.exp(logits[yes]) / (math.exp(logits[yes]) + math.exp(logits[no]))
        assert row["p_yes"] == pytest.approx(want, abs=1e-5) and row["intervention"] == iv


def test_command_reports_every_value_and_intervention(model, data, tmp_path, tiny_phi3, capsys):
    from phi3v.cli import discrim as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "discrim.json"
    args = parser.parse_args(["--model", str(tiny_phi3), "--dtype", "float32", "--data", str(data), "--out", str(out),
                              "--interventions", "none", "illegal", "--batch", "16"])
    assert cli.run(args) == 0
    rep = json.loads(out.read_text())
    assert rep["interventions"] == ["illegal", "none"]
    assert sorted(rep["fits"]) == [f"{i}/{f}" for i in ("illegal", "none") for f in ("explicit", "implicit")]
    want = {f"race={r}" for r in RACES[1:]} | {f"gender={g}" for g in GENDERS[1:]} | {"age=20", "age=100"}
    assert {f"{a}={v}" for a, vs in rep["attribute_values"].items() for v in vs} == want
    for fit in rep["fits"].values():
        assert set(fit["scores"]) - {"intercept", "converged", "warnings"} == want and fit["n"] == 2 * 3 * 3 * 5
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert all(name in printed for name in want) and "illegal/explicit" in printed


def test_models_without_a_chat_template_get_the_human_assistant_frame(tmp_path):
    """Phi-2 has no chat template: the decision prompt is the paper's plain Human/Assistant text."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    from phi3v.processing.tokenizer import Tokenizer

    hf = HF(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([D.ANSWER_PREFIX + "yes", D.ANSWER_PREFIX + "no"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    item = D.DiscrimItem("Should the loan be approved?", 0, 60.0, "male", "white", "explicit")
    assert not D._has_template(tok)
    text = tok.decode(D.prompt_ids(tok, item, "ignore", chat=False))
    assert text == ("Human: Should the loan be approved?" + D.INTERVENTIONS["ignore"] + D.QUESTION_SUFFIX
                    + "\n\nAssistant: " + D.ANSWER_PREFIX)
    yes, no = D.answer_ids(tok)
    assert tok.decode([yes]).startswith("y") and tok.decode([no]).startswith("n")


def test_registered_as_an_eval_task(data):
    from phi3v.eval.tasks import TASKS, get_task

    task = get_task("discrim")
    assert "discrim" in TASKS and task.generates is False
    assert len(task.load(data)) == len(D.load_discrim(data))
