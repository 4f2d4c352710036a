"""The runner on a tiny random vision checkpoint: batched predictions equal direct generation, scores follow
from the predictions, and re-scoring a saved report gives the identical report."""

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

import phi3v
from phi3v.errors import InputError
from phi3v.eval import datasets as ds
from phi3v.eval import runner
from phi3v.eval.tasks import get_task

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "Phi-3.5-vision-instruct"
NEW_TOKENS = 4


def _create_random():
    try:
        from phi3v.checkpoint.random import create_random
    except ImportError:  # before the re-layout
        from phi3v.random_checkpoint import create_random
    return create_random


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    if not REFERENCE.is_dir():
        pytest.skip(f"no reference config at {REFERENCE}")
    out = tmp_path_factory.mktemp("eval-random")
    _create_random()(REFERENCE, out, seed=0, layers=2, hidden=64, heads=4, intermediate=96)
    return out


@pytest.fixture(scope="session")
def model(model_dir):
    return phi3v.load(model_dir)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    rows = []
    for k, (family, answer) in enumerate([("menu", "$4.50"), ("chart", "March"), ("menu", "$1.00")]):
        path = root / "test" / "images" / f"{family}-{k:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (60 + 20 * k, 40), (40 * k, 120, 200)).save(path)
        rows.append({"id": f"test-{family}-{k:05d}-q0", "family": family, "kind": "price", "question": f"Q{k}?",
                     "answer": answer, "answers": [answer], "images": [f"images/{path.name}"]})
    (root / "test" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_report_values(model, synth_dir):
    task, items = get_task("synth"), ds.load_synth(synth_dir, "test")
    calls = []
    rep = runner.evaluate(model, task, items, batch=2, max_new_tokens=NEW_TOKENS,
                          progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 3), (3, 3)]
    assert (rep["task"], rep["prompt"], rep["n"], rep["model"]) == ("synth", "{question}", 3, str(model.path))
    assert [r["id"] for r in rep["items"]] == [i.id for i in items]
    for item, row in zip(items, rep["items"]):
        direct = model.generate([{"role": "user", "content": item.question, "images": item.images}],
                                max_new_tokens=NEW_TOKENS, temperature=0).text
        assert row["prediction"] == direct
        assert row["score"] == float(task.score_one(item, direct))
        assert (row["answers"], row["category"], row["question"]) == (item.answers, item.category, item.question)
    scores = [r["score"] for r in rep["items"]]
    assert rep["overall"] == sum(scores) / 3
    assert rep["categories"] == {"chart": scores[1], "menu": (scores[0] + scores[2]) / 2}


def test_rescore_saved_report_is_identical(model, synth_dir, tmp_path):
    task, items = get_task("synth"), ds.load_synth(synth_dir, "test")
    rep = runner.evaluate(model, task, items, batch=3, max_new_tokens=NEW_TOKENS)
    saved = runner.save(rep, tmp_path / "r.json")
    again = runner.rescore(task, runner.load_predictions(saved))
    assert again == rep
    # a jsonl of {"id", "prediction"} re-scored against the dataset: same items, predictions and scores
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"id": r["id"], "prediction": r["prediction"]}) + "\n" for r in rep["items"]))
    from_jsonl = runner.rescore(task, runner.load_predictions(jl), items)
    assert from_jsonl["items"] == rep["items"] and from_jsonl["overall"] == rep["overall"]
    with pytest.raises(InputError, match="--data"):
        runner.rescore(task, runner.load_predictions(jl))


def test_rescore_gives_right_answers_full_marks(synth_dir):
    task, items = get_task("synth"), ds.load_synth(synth_dir, "test")
    preds = [{"id": items[0].id, "prediction": " $4.50. "}, {"id": items[1].id, "prediction": "april"}]
    rep = runner.rescore(task, preds, items)
    assert [r["score"] for r in rep["items"]] == [1.0, 0.0]
    assert (rep["n"], rep["overall"], rep["categories"]) == (2, 0.5, {"chart": 0.0, "menu": 1.0})
    with pytest.raises(InputError, match="not in the dataset"):
        runner.rescore(task, [{"id": "nope", "prediction": "x"}], items)


def test_bad_item_is_reported_not_fatal(model, synth_dir):
    task, items = get_task("synth"), ds.load_synth(synth_dir, "test")
    items[1].images = [synth_dir / "missing.png"]
    rep = runner.evaluate(model, task, items, batch=3, max_new_tokens=NEW_TOKENS)
    assert "image file not found" in rep["items"][1]["error"]
    assert rep["items"][1]["prediction"] == "" and rep["items"][1]["score"] == 0.0
    assert rep["items"][0]["prediction"] and "error" not in rep["items"][0]


def test_batches_group_by_budget():
    task = get_task("synth")
    answers = [["$4.50", "4.50"], ["| a |\n|---|\n| 1 |"], ["March"], ["[]"], ["£1"]]
    items = [ds.Item(str(k), f"q{k}", a) for k, a in enumerate(answers)]
    assert [task.budget(i) for i in items] == [21, 33, 21, 18, 19]  # UTF-8 bytes of the longest answer + 16
    assert runner.batches(task, items, 2, None) == [(19, [3, 4]), (21, [0, 2]), (33, [1])]
    assert runner.batches(task, items, 8, 5) == [(5, [0, 1, 2, 3, 4])]


def test_same_question_different_images_in_one_run(model, synth_dir):
    task, items = get_task("synth"), ds.load_synth(synth_dir, "test")
    for item in items:
        item.question = "How many shapes?"  # same prompt ids where the images give the same token counts
    rep = runner.evaluate(model, task, items, batch=3, max_new_tokens=NEW_TOKENS)
    direct = [model.generate(runner.conversation(task, i), max_new_tokens=NEW_TOKENS, temperature=0).text
              for i in items]
    assert [r["prediction"] for r in rep["items"]] == direct


def cli(*argv):
    from phi3v.cli import eval as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    return cmd.run(p.parse_args(list(argv)))


def test_cli_report_chart_and_rescore(model_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "rep" / "report.json"
    assert cli("--model", str(model_dir), "--task", "synth", "--data", str(synth_dir), "--limit", "2",
               "--batch", "2", "--max-new-tokens", str(NEW_TOKENS), "--out", str(out), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    rep = json.loads(out.read_text())
    assert summary == {k: v for k, v in rep.items() if k != "items"} and rep["n"] == 2
    with Image.open(out.with_suffix(".png")) as img:
        assert img.format == "PNG" and img.width > 300
    out2 = tmp_path / "again.json"
    assert cli("--task", "synth", "--predictions", str(out), "--out", str(out2)) == 0
    assert json.loads(out2.read_text()) == rep
    table = capsys.readouterr().out
    assert "overall" in table and "exact match" in table
    with pytest.raises(InputError, match="give --data"):  # (no --model: the bundled phi3v-nano is the default)
        cli("--task", "synth")


# ---- task-level scoring through rescore (no model): grouping and aggregation as the references do it
def Item(id, answers, category="", choices=(), **meta):
    return ds.Item(str(id), "q", list(answers), [], category, list(choices), meta)


def test_mmbench_circular_report():
    items = [Item(1, ["A"], "color", ["red", "blue"], index=1), Item(1_000_001, ["B"], "color", ["blue", "red"],
             index=1_000_001), Item(2, ["A"], "shape", ["box", "ball"], index=2),
             Item(1_000_002, ["B"], "shape", ["ball", "box"], index=1_000_002)]
    preds = ["A", "B. red", "A", "A"]  # group 1 right both times; group 2 wrong once
    rep = runner.rescore(get_task("mmbench"), [{"id": i.id, "prediction": p} for i, p in zip(items, preds)], items)
    assert [r["score"] for r in rep["items"]] == [1.0, 1.0, 1.0, 0.0]
    assert (rep["overall"], rep["categories"]) == (0.5, {"color": 1.0, "shape": 0.0})
    assert rep["metrics"] == {"groups": 2, "vanilla_accuracy": 0.75}


def test_pope_report():
    items = [Item(k, [a], c) for k, (a, c) in enumerate(
        [("yes", "random"), ("no", "random"), ("yes", "popular"), ("no", "popular")])]
    preds = ["Yes.", "Yes", "No", "no, it is not"]
    rep = runner.rescore(get_task("pope"), [{"id": i.id, "prediction": p} for i, p in zip(items, preds)], items)
    assert [r["score"] for r in rep["items"]] == [1.0, 0.0, 0.0, 1.0]
    # overall: tp 1, fp 1, fn 1 -> P = R = F1 = 0.5; random: P 1/2, R 1 -> F1 2/3; popular: no true positive -> 0
    assert rep["overall"] == pytest.approx(0.5)
    assert rep["categories"] == pytest.approx({"popular": 0.0, "random": 2 / 3})
    assert rep["metrics"]["accuracy"] == 0.5 and rep["metrics"]["yes_ratio"] == 0.5


def test_chartqa_human_augmented_report():
    items = [Item(0, ["12"], "human"), Item(1, ["Yes"], "human"), Item(2, ["0.45"], "augmented")]
    preds = ["12.4", "no", "45%"]
    rep = runner.rescore(get_task("chartqa"), [{"id": i.id, "prediction": p} for i, p in zip(items, preds)], items)
    assert (rep["overall"], rep["categories"]) == (pytest.approx(2 / 3), {"augmented": 1.0, "human": 0.5})


def test_mmmu_fallback_stream_follows_item_order():
    items = [Item(k, ["A"], "Art", ["x", "y", "z", "w"], question_type="multiple-choice") for k in range(3)]
    items.append(Item(3, ["1505"], "Art", question_type="open"))
    preds = ["hmm", "no idea", "(A)", "It was finished in 1505."]
    task = get_task("mmmu")
    rep = runner.rescore(task, [{"id": i.id, "prediction": p} for i, p in zip(items, preds)], items)
    # random.Random(42) picks A then A for the two unparseable answers: both "right", as MMMU would count them
    assert [r["score"] for r in rep["items"]] == [1.0, 1.0, 1.0, 1.0]
    assert runner.rescore(task, rep) == rep


def test_cli_rescores_jsonl_against_data(tmp_path, capsys):
    lines = [{"question_id": k, "image": "x.jpg", "text": f"Is there a thing {k}?", "label": lab}
             for k, lab in enumerate(["yes", "no", "yes", "no"])]
    (tmp_path / "coco_pope_random.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": f"random-{k}", "prediction": p}) + "\n"
                             for k, p in enumerate(["Yes", "No", "Yes, there is.", "yes"])))
    assert cli("--task", "pope", "--data", str(tmp_path), "--predictions", str(preds), "--json") == 0
    s = json.loads(capsys.readouterr().out)
    # tp 2, fp 1, fn 0: precision 2/3, recall 1, F1 0.8; accuracy 3/4
    assert (s["n"], s["overall"], s["metrics"]["accuracy"], s["categories"]) == (4, pytest.approx(0.8), 0.75,
                                                                                 {"random": pytest.approx(0.8)})
