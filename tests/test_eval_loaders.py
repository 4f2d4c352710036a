"""Every loader reads small files the test writes in the layout the benchmark is published in."""

import base64
import io
import json

import pytest
from PIL import Image

from phi3v.errors import InputError
from phi3v.eval import datasets as ds
from phi3v.eval.tasks import get_task


def png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_chartqa_json(tmp_path):
    split = tmp_path / "test"
    (split / "test_human.json").parent.mkdir()
    (split / "test_human.json").write_text(json.dumps([{"imgname": "a.png", "query": "Max?", "label": "12"}]))
    (split / "test_augmented.json").write_text(json.dumps([{"imgname": "b.png", "query": "Min?", "label": "Yes"}]))
    write_png(split / "png" / "a.png")
    for path in (tmp_path, split):
        items = ds.load_chartqa(path, "test")
        assert [(i.id, i.question, i.answers, i.category) for i in items] == [
            ("test_human-0", "Max?", ["12"], "human"), ("test_augmented-0", "Min?", ["Yes"], "augmented")]
        assert items[0].images == [split / "png" / "a.png"]
    with pytest.raises(InputError, match="test_human.json"):
        ds.load_chartqa(tmp_path / "test" / "png", "test")


def test_chartqa_parquet(tmp_path):
    img = png_bytes()
    f = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [
        {"type": "human_test", "question": "Q1", "answer": "3", "image": {"bytes": img, "path": None}},
        {"type": "augmented_test", "question": "Q2", "answer": "no", "image": {"bytes": img, "path": None}}])
    for path in (tmp_path, f):
        items = ds.load_chartqa(path, "test")
        assert [(i.question, i.answers, i.category) for i in items] == [("Q1", ["3"], "human"),
                                                                        ("Q2", ["no"], "augmented")]
        assert items[0].images == [img]


def test_docvqa(tmp_path):
    write_png(tmp_path / "documents" / "doc1.png")
    (tmp_path / "val_v1.0.json").write_text(json.dumps({"dataset_split": "val", "data": [
        {"questionId": 7, "question": "Date?", "image": "documents/doc1.png", "docId": 1,
         "answers": ["1 May", "May 1"], "question_types": ["form"]}]}))
    [item] = ds.load_docvqa(tmp_path, "val")
    assert (item.id, item.question, item.answers, item.category) == ("7", "Date?", ["1 May", "May 1"], "form")
    assert item.images == [tmp_path / "documents" / "doc1.png"]


def test_textvqa(tmp_path):
    write_png(tmp_path / "train_images" / "abc.jpg")
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what brand?", "image_id": "abc", "answers": ["nokia"] * 10}]}))
    [item] = ds.load_textvqa(tmp_path, "val")
    assert (item.id, item.answers, item.images) == ("34602", ["nokia"] * 10, [tmp_path / "train_images" / "abc.jpg"])
    assert get_task("textvqa").render(item) == "What brand?\nAnswer the question using a single word or phrase."


def test_scienceqa(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "Look.",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "2": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
              "subject": "language science", "split": "test"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"], "train": []}))
    write_png(tmp_path / "images" / "test" / "1" / "image.png")
    [item] = ds.load_scienceqa(tmp_path, "test")  # ScienceQA-IMG: the question without an image is left out
    assert (item.id, item.answers, item.choices, item.category) == ("1", ["B"], ["frog", "dog"], "natural science")
    assert item.images == [tmp_path / "images" / "test" / "1" / "image.png"]
    assert len(ds.load_scienceqa(tmp_path, "test", with_images_only=False)) == 2
    assert get_task("scienceqa").render(item) == ("Context: Look.\nWhich is a mammal?\nA. frog\nB. dog\n"
                                                  "Answer with the option's letter from the given choices directly.")
    with pytest.raises(InputError, match="minival"):
        ds.load_scienceqa(tmp_path, "minival")


def test_ai2d_release_folder(tmp_path):
    write_png(tmp_path / "images" / "3.png")
    doc = {"imageName": "3.png", "questions": {"What eats grass?": {
        "abcLabel": False, "answerTexts": ["cow", "lion", "hawk", "snake"], "correctAnswer": 0,
        "questionId": "3.png-0"}}}
    (tmp_path / "questions").mkdir()
    (tmp_path / "questions" / "3.png.json").write_text(json.dumps(doc))
    (tmp_path / "questions" / "4.png.json").write_text(json.dumps({**doc, "imageName": "4.png"}))
    (tmp_path / "ai2d_test_ids.csv").write_text("3\n")
    [item] = ds.load_ai2d(tmp_path, "test")
    assert (item.id, item.answers, item.choices) == ("3.png-0", ["A"], ["cow", "lion", "hawk", "snake"])
    assert item.images == [tmp_path / "images" / "3.png"]
    assert [i.images[0].name for i in ds.load_ai2d(tmp_path, "train")] == ["4.png"]


def test_ai2d_parquet(tmp_path):
    write_parquet(tmp_path / "test.parquet", [
        {"question": "Which?", "options": ["x", "y", "z"], "answer": "2", "image": {"bytes": png_bytes(), "path": ""}}])
    [item] = ds.load_ai2d(tmp_path / "test.parquet")
    assert (item.question, item.choices, item.answers) == ("Which?", ["x", "y", "z"], ["C"])


def test_mmmu_parquet(tmp_path):
    img1, img2 = png_bytes((1, 2, 3)), png_bytes((4, 5, 6))
    rows = [{"id": "validation_Art_Theory_1", "question": "Look at <image 2>. Which style?",
             "options": "['Baroque', 'Gothic']", "answer": "B", "question_type": "multiple-choice",
             "image_1": {"bytes": img1, "path": "a"}, "image_2": {"bytes": img2, "path": "b"}},
            {"id": "validation_Art_Theory_2", "question": "<image 1> Year?", "options": "[]", "answer": "1505",
             "question_type": "open", "image_1": {"bytes": img1, "path": "a"}, "image_2": None}]
    write_parquet(tmp_path / "Art_Theory" / "validation-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "Art_Theory" / "dev-00000-of-00001.parquet", rows[:1])
    a, b = ds.load_mmmu(tmp_path, "validation")
    assert (a.id, a.choices, a.answers, a.category, a.meta) == (
        "validation_Art_Theory_1", ["Baroque", "Gothic"], ["B"], "Art_Theory", {"question_type": "multiple-choice"})
    assert a.images == [img2]  # only the image the question names
    assert (b.choices, b.images, b.meta["question_type"]) == ([], [img1], "open")
    task = get_task("mmmu")
    assert task.render(a) == ("Look at <image 2>. Which style?\nA. Baroque\nB. Gothic\n\n"
                              "Answer with the option's letter from the given choices directly.")
    assert task.render(b) == "<image 1> Year?\n\nAnswer the question using a single word or phrase."
    assert len(ds.load_mmmu(tmp_path, "dev")) == 1
    assert ds.mmmu_answers("['24', '24.0']") == ["24", "24.0"] and ds.mmmu_answers("[1, 2") == ["[1, 2"]


def test_mmbench_tsv(tmp_path):
    b64 = base64.b64encode(png_bytes()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    rows = [["1", "What color?", "nan", "red", "blue", "", "", "A", "color", b64, "perception", "dev"],
            ["1000001", "What color?", "nan", "blue", "red", "", "", "B", "color", "1", "perception", "dev"]]
    f = tmp_path / "MMBench_DEV_EN.tsv"
    f.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n")
    a, b = ds.load_mmbench(tmp_path, "dev")
    assert (a.id, a.choices, a.answers, a.category, a.meta["index"], a.meta["hint"]) == (
        "1", ["red", "blue"], ["A"], "color", 1, "")
    assert a.images == b.images == [png_bytes()]  # row 1000001 names row 1's image
    assert get_task("mmbench").render(a) == ("What color? There are several options:\nA. red\nB. blue\n"
                                             "Answer with the option's letter from the given choices directly.")


def test_pope(tmp_path):
    write_png(tmp_path / "val2014" / "COCO_1.jpg")
    lines = [{"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog in the image?", "label": "yes"},
             {"question_id": 2, "image": "COCO_1.jpg", "text": "Is there a cat in the image?", "label": "no"}]
    for v in ("adversarial", "random"):
        (tmp_path / f"coco_pope_{v}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = ds.load_pope(tmp_path)
    assert [(i.id, i.answers, i.category) for i in items] == [
        ("adversarial-1", ["yes"], "adversarial"), ("adversarial-2", ["no"], "adversarial"),
        ("random-1", ["yes"], "random"), ("random-2", ["no"], "random")]
    assert items[0].images == [tmp_path / "val2014" / "COCO_1.jpg"]
    assert len(ds.load_pope(tmp_path / "coco_pope_random.json")) == 2
    assert len(ds.load_pope(tmp_path, "random")) == 2


def write_synth(root, split="test", n=3):
    rows = []
    for k in range(n):
        write_png(root / split / "images" / f"menu-{k:05d}.png", (k, 0, 0))
        rows.append({"id": f"{split}-menu-{k:05d}-q0", "family": "menu" if k % 2 == 0 else "chart",
                     "kind": "price", "question": f"How much is item {k}?", "answer": f"${k}.50",
                     "answers": [f"${k}.50", f"{k}.50"], "images": [f"images/menu-{k:05d}.png"],
                     "messages": [], "facts": {"k": k}})
    (root / split / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / split / "qa.jsonl"


def test_synth(tmp_path):
    jsonl = write_synth(tmp_path)
    for path in (tmp_path, tmp_path / "test", jsonl):
        items = ds.load_synth(path, "test")
        assert [(i.id, i.answers[0], i.category, i.meta["kind"]) for i in items] == [
            ("test-menu-00000-q0", "$0.50", "menu", "price"), ("test-menu-00001-q0", "$1.50", "chart", "price"),
            ("test-menu-00002-q0", "$2.50", "menu", "price")]
        assert items[1].images == [tmp_path / "test" / "images" / "menu-00001.png"]
    with pytest.raises(InputError, match="phi3v synth"):
        ds.load_synth(tmp_path, "val")


def test_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(InputError, match="--data"):
        get_task("docvqa").load(tmp_path / "nope")
    with pytest.raises(InputError, match="unknown task"):
        get_task("gqa")


def test_file_in_another_layout_is_an_input_error(tmp_path):
    (tmp_path / "val_v1.0.json").write_text(json.dumps({"data": [{"question": "no id"}]}))
    with pytest.raises(InputError, match="does not look like docvqa data"):
        get_task("docvqa").load(tmp_path)
