"""`phi3v recipe nano` on a micro budget: every phase runs, OUT/final loads and answers, the reports and plots are
written, a run killed inside a training phase resumes from its checkpoint, and the CLI runs the same recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import phi3v
from phi3v.checkpoint.random import Sizes
from phi3v.cli import recipe as recipe_cli
from phi3v.errors import InputError
from phi3v.processing.image import ImageProcessor
from phi3v.recipes.data import rejected_rate, sft_records
from phi3v.recipes.nano import PHASES, NanoPlan, native_bf16, parse_steps, run_recipe

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LIKE = SHARED / "reference" / "Phi-3.5-vision-instruct"
MICRO = Sizes(layers=1, hidden=64, heads=2, intermediate=64, vision_layers=1, vision_hidden=32, vision_heads=2,
              vision_intermediate=64, vision_image_size=40, vision_patch_size=5)

pytestmark = pytest.mark.skipif(not (LIKE / "tokenizer.json").is_file(), reason="needs the shared reference tokenizer")


def micro_plan() -> NanoPlan:
    return NanoPlan(sizes=MICRO, num_crops=4, train_images=5, eval_images=5, batch=2, min_steps=2, max_steps=2,
                    eval_batch=16, eval_max_new_tokens=3)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """A micro run killed at SFT's last step (after step 1's checkpoint), then resumed to the end."""
    out = tmp_path_factory.mktemp("recipe") / "run"
    events = []

    def record(phase, done, total, info):
        events.append((phase, done, info.get("split")))

    def kill_in_sft(phase, done, total, info):
        record(phase, done, total, info)
        if phase == "sft" and done == 2 and info.get("split") == "train":
            raise Killed
    with pytest.raises(Killed):
        run_recipe(out, budget_minutes=0.01, seed=3, plan=micro_plan(), like=LIKE, progress=kill_in_sft)
    before = json.loads((out / "recipe.json").read_text())
    state = run_recipe(out, budget_minutes=0.01, seed=3, plan=micro_plan(), like=LIKE, resume=True,
                       progress=record)
    return out, before, state, events


def test_killed_run_resumes_every_phase_once(killed_then_resumed):
    out, before, state, events = killed_then_resumed
    assert before["done"] == ["data", "init", "pretrain"] and before["steps"] == {"pretrain": 2, "sft": 2}
    assert state["done"] == list(PHASES) and state["steps"] == {"pretrain": 2, "sft": 2, "dpo": 2}
    sft_steps = [json.loads(ln)["step"] for ln in (out / "sft" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(ln)["split"] == "train"]
    assert sft_steps == [1, 2]  # step 1 logged once: the resumed run continued from its checkpoint
    assert events.count(("sft", 1, "train")) == 1 and events.count(("sft", 2, "train")) == 2  # step 2 redone only
    assert events.count(("data", 1, None)) == 1  # the data was not drawn again
    # autocast "fastest": chosen once, before pretraining, and kept by the resumed run; timed only with native bf16
    assert before["autocast"] == state["autocast"]
    if native_bf16(torch.device("cpu")):
        assert set(state["autocast_seconds"]) == {"off", "bf16"}
        assert state["autocast"] == min(state["autocast_seconds"], key=state["autocast_seconds"].get)
    else:
        assert state["autocast"] == "off" and "autocast_seconds" not in state


def test_final_checkpoint_loads_with_nano_sizes_and_answers(killed_then_resumed):
    out, _, state, _ = killed_then_resumed
    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["phi3v_model"] == "phi3v-nano" and "phi3v_random_weights" not in cfg
    assert cfg["torch_dtype"] == "bfloat16" and cfg["hidden_size"] == 64
    vision = cfg["img_processor"]["vision_config"]
    assert (vision["image_size"], vision["patch_size"], cfg["img_processor"]["num_img_tokens"]) == (40, 5, 16)
    proc = ImageProcessor.from_dir(final)
    assert (proc.crop_size, proc.patch_size, proc.num_crops) == (40, 5, 4)
    assert state["results"]["final"]["bytes"] == (final / "model.safetensors").stat().st_size
    model = phi3v.load(final, dtype="float32")
    image = out / "data" / "test" / "images" / sorted(p.name for p in (out / "data" / "test" / "images").iterdir())[0]
    reply = model.generate([{"role": "user", "content": "What is this?", "images": [str(image)]}],
                           max_new_tokens=3, temperature=0)
    with Image.open(image) as im:
        image_tokens = proc.num_tokens_for_size(*im.size)
    assert isinstance(reply.text, str) and image_tokens < reply.prompt_tokens < image_tokens + 30


def test_reports_and_plots_are_written(killed_then_resumed):
    out, _, state, _ = killed_then_resumed
    for name in ("sft-test", "final-test", "final-test-novel"):
        rep = json.loads((out / "reports" / name / "report.json").read_text())
        assert rep["task"] == "synth" and rep["n"] == len(rep["items"]) > 0
        assert (out / "reports" / name / "report.png").read_bytes()[:4] == b"\x89PNG"
        assert set(rep["rejected_style"]) == {"pairs", "rejected", "rate"}
    assert set(state["results"]["eval"]) == {"test", "test-novel"}
    assert set(state["results"]["eval"]["test"]["categories"]) == {"menu", "chart", "table", "text", "shapes"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert set(state["minutes"]) == set(PHASES)


def test_a_second_run_in_the_same_folder_needs_resume(killed_then_resumed):
    out = killed_then_resumed[0]
    with pytest.raises(InputError, match="--resume"):
        run_recipe(out, plan=micro_plan(), like=LIKE)
    with pytest.raises(InputError, match="positive"):
        run_recipe(out / "other", budget_minutes=0, plan=micro_plan(), like=LIKE)


def test_sft_conversations_ask_every_question_of_an_image_once(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    qa = [{"id": f"i-q{k}", "images": ["images/a.png"], "question": f"Q{k}?", "answer": f"A{k}", "kind": "value"}
          for k in range(3)]
    (split / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (split / "transcribe.jsonl").write_text(json.dumps({"images": ["images/a.png"], "messages": [
        {"role": "user", "content": "<|image_1|>\nTranscribe the text in the image."},
        {"role": "assistant", "content": "A0 A1 A2"}]}) + "\n")
    (conv,) = sft_records(split, seed=0)
    users = [m["content"] for m in conv["messages"] if m["role"] == "user"]
    assert users[0].startswith("<|image_1|>\n") and sum("<|image_1|>" in u for u in users) == 1
    assert sorted(u.removeprefix("<|image_1|>\n") for u in users[:3]) == ["Q0?", "Q1?", "Q2?"]
    assert users[3] == "Transcribe the text in the image." and conv["messages"][-1]["content"] == "A0 A1 A2"
    (split / "dpo.jsonl").write_text(json.dumps({"id": "i-q0", "rejected": "$4.50"}) + "\n"
                                     + json.dumps({"id": "i-q1", "rejected": "7"}) + "\n")
    report = {"items": [{"id": "i-q0", "prediction": "$4.50."}, {"id": "i-q1", "prediction": "8"}]}
    assert rejected_rate(report, split) == {"pairs": 2, "rejected": 1, "rate": 0.5}


def test_autocast_setting_is_checked_and_recorded(tmp_path):
    plan = micro_plan()
    plan.autocast = "fp16"
    with pytest.raises(InputError, match="fastest, bf16 or off"):
        run_recipe(tmp_path / "bad", budget_minutes=0.01, plan=plan, like=LIKE)
    assert not (tmp_path / "bad").exists()  # refused before any phase


def test_cli_parses_the_recipe_flags():
    parser = argparse.ArgumentParser()
    recipe_cli.add_arguments(parser)
    assert parser.parse_args(["nano", "--out", "x", "--autocast", "bf16"]).autocast == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["nano", "--out", "x", "--autocast", "fp16"])
    args = parser.parse_args(["nano", "--out", "x", "--budget-minutes", "5", "--seed", "7", "--resume"])
    assert (args.name, args.out, args.budget_minutes, args.seed, args.resume, args.device) == \
        ("nano", "x", 5.0, 7, True, "cpu")
    assert recipe_cli.HELP


def test_fixed_steps_replace_the_timed_plan(tmp_path):
    """--steps reruns a recorded run: the counts come from the command, not from timing this machine."""
    plan = micro_plan()
    plan.steps = parse_steps("pretrain=3,sft=1,dpo=1")
    state = run_recipe(tmp_path / "run", budget_minutes=0.01, seed=3, plan=plan, like=LIKE)
    assert state["steps"] == {"pretrain": 3, "sft": 1, "dpo": 1}  # past max_steps=2: not clamped
    assert "step_seconds" not in state  # nothing was timed
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()
              if json.loads(ln)["split"] == "train"]
    assert logged == [1, 2, 3]
    for bad in ("pretrain=0", "eval=3", "sft=x", "sft"):
        with pytest.raises(InputError, match="--steps"):
            parse_steps(bad)


def test_fixed_steps_survive_a_kill_before_the_phase_ends(tmp_path):
    """The counts are written to OUT/recipe.json before training: a run killed mid-phase and resumed without
    --steps goes on with them (not with a count timed anew)."""
    plan = micro_plan()
    plan.steps = {"pretrain": 3}

    def kill(phase, done, total, info):
        if phase == "pretrain" and done == 1:
            raise Killed
    with pytest.raises(Killed):
        run_recipe(tmp_path / "run", budget_minutes=0.01, seed=3, plan=plan, like=LIKE, progress=kill)
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["steps"] == {"pretrain": 3}
    state = run_recipe(tmp_path / "run", budget_minutes=0.01, seed=3, plan=micro_plan(), like=LIKE, resume=True)
    assert state["steps"]["pretrain"] == 3
