"""End to end against the golden outputs of Microsoft's reference code (shared/fixtures/phi3v, float32).

Every case: input_ids, image_sizes and num_img_tokens equal; projected image features, the final hidden
states and the last logits within 1e-4; the greedy tokens identical (B4 crosses the LongRoPE boundary of 512
while generating, A6 starts past 4096).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FIXTURES
from phi3v.models import config_from_dict
from phi3v.inference.generate import generate_steps
from phi3v.inference.requests import Prompt
from phi3v.processing.image import ImageProcessor
from phi3v.checkpoint.load import load_causal_lm
from phi3v.models.phi3_v import recomputes_on_long_switch
from phi3v.processing.prompts import tokenize_with_images
from phi3v.inference.sampling import SamplingParams
from phi3v.processing.tokenizer import Tokenizer

TOL = dict(atol=1e-4, rtol=1e-4)
INDEX = json.loads((FIXTURES / "index.json").read_text()) if FIXTURES.is_dir() else {"models": {}}
CASES = [(m, c) for m, info in INDEX["models"].items() for c in info["cases"]]
EOS_ONLY = frozenset({2})  # the fixtures' generation stops on </s> only (README quirk 12)
_models: dict = {}


def model_for(name):
    if name not in _models:
        d = FIXTURES / name
        raw = json.loads((d / "config.json").read_text())
        model = load_causal_lm(d, config_from_dict(raw), torch.float32, raw=raw)
        _models[name] = (model, Tokenizer.from_dir(d), ImageProcessor.from_dir(d), recomputes_on_long_switch(d))
    return _models[name]


@pytest.fixture(scope="module", params=CASES, ids=[c for _, c in CASES])
def case(request):
    name, case = request.param
    d = FIXTURES / name / case
    manifest = json.loads((d / "manifest.json").read_text())
    tensors = load_file(d / "tensors.safetensors")
    images = [Image.open(d / im["file"]) for im in manifest["images"]]
    model, tok, proc, recompute = model_for(name)
    if images:
        processed = proc(images, num_crops=manifest["num_crops"])
        pixel_values, image_sizes = processed["pixel_values"], processed["image_sizes"]
        counts = processed["num_img_tokens"]
    else:
        pixel_values = image_sizes = None
        counts = []
    ids = tokenize_with_images(tok, manifest["prompt"], counts)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), pixel_values, image_sizes)
        logits, hidden = model(inputs_embeds=embeds, return_hidden=True)
    return dict(manifest=manifest, tensors=tensors, ids=ids, image_sizes=image_sizes, counts=counts, model=model,
                pixel_values=pixel_values, embeds=embeds, logits=logits, hidden=hidden, recompute=recompute)


def test_prompt_ids_and_image_sizes(case):
    t = case["tensors"]
    assert case["ids"] == t["input_ids"][0].tolist()
    if "image_sizes" in t:
        assert case["image_sizes"].tolist() == t["image_sizes"].tolist()
        assert case["counts"] == t["num_img_tokens"].tolist()


def test_image_features(case):
    t = case["tensors"]
    if case["pixel_values"] is None:
        return
    with torch.no_grad():
        feats = case["model"].model.vision_embed_tokens(case["pixel_values"], case["image_sizes"])
    assert len(feats) == len(case["counts"])
    for k, f in enumerate(feats):
        torch.testing.assert_close(f, t[f"image_features_proj.{k}"], **TOL)


def test_hidden_states_and_last_logits(case):
    t = case["tensors"]
    torch.testing.assert_close(case["hidden"], t["last_hidden_state"], **TOL)
    torch.testing.assert_close(case["logits"][:, -1], t["last_logits"], **TOL)


def test_greedy_generation(case):
    t = case["tensors"]
    expected = t["generated_ids"][0].tolist()
    prompt = Prompt(case["ids"], case["embeds"][0])
    params = SamplingParams(max_new_tokens=len(expected))
    steps = generate_steps(case["model"], [prompt], params, EOS_ONLY, recompute_on_long_switch=case["recompute"])
    assert [s[0].token for s in steps] == expected
