"""The `phi3v` command line: generate (text and images, --json), chat over stdin, create-random, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import FIXTURES, PHI35_MINI
from phi3v.cli import main

B1 = FIXTURES / "phi35_vision_tiny" / "B1_single_800x600"


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_equals_api(tiny_phi3, capsys):
    from phi3v.api import load

    out = run_json(capsys, "generate", "--model", str(tiny_phi3), "--prompt", "Hello there", "--max-new-tokens", "12",
                   "--dtype", "float32", "--json")
    ref = load(tiny_phi3, dtype="float32").generate("Hello there", max_new_tokens=12)
    assert out == ref.to_dict()
    assert set(out) == {"text", "token_ids", "prompt_tokens", "finish_reason"}
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 12


def test_generate_with_image_reproduces_reference(capsys):
    """The CLI path (image file -> processor -> prompt -> greedy) gives the reference's tokens for case B1."""
    expected = load_file(B1 / "tensors.safetensors")["generated_ids"][0].tolist()
    out = run_json(capsys, "generate", "--model", str(B1.parent), "--image", str(B1 / "image_1.png"),
                   "--prompt", "What is shown in this image?", "--max-new-tokens", str(len(expected)),
                   "--dtype", "float32", "--json")
    assert out["token_ids"] == expected and out["prompt_tokens"] == 775


def test_stream_prints_same_text(tiny_phi3, capsys):
    js = run_json(capsys, "generate", "--model", str(tiny_phi3), "--prompt", "Hi", "--max-new-tokens", "10",
                  "--dtype", "float32", "--json")
    assert main(["generate", "--model", str(tiny_phi3), "--prompt", "Hi", "--max-new-tokens", "10",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == js["text"] + "\n"


def test_random_weights_are_labelled(tiny_phi3, capsys):
    main(["generate", "--model", str(tiny_phi3), "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "float32"])
    assert "RANDOM weights" in capsys.readouterr().err


def test_chat_over_stdin_is_multi_turn(tiny_phi3):
    from phi3v.api import load

    lines = "first question\n/reset\nhello\nsecond turn\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "phi3v.cli", "chat", "--model", str(tiny_phi3), "--dtype", "float32",
                           "--max-new-tokens", "6"], input=lines, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [part.split("\n")[0] for part in proc.stdout.split("assistant> ")[1:]]
    m = load(tiny_phi3, dtype="float32")
    first = m.generate("first question", max_new_tokens=6).text
    hello = m.generate("hello", max_new_tokens=6).text
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": hello},
             {"role": "user", "content": "second turn"}]
    assert replies == [first, hello, m.chat(convo, max_new_tokens=6).text]


def test_create_random_cli(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["create-random", "--like", str(PHI35_MINI), "--out", str(out), "--layers", "1", "--hidden", "32",
                 "--heads", "2", "--intermediate", "48"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["phi3v_random_weights"]) == (1, 32, True)
    assert (out / "tokenizer.json").read_bytes() == (PHI35_MINI / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/model"], "is not a local folder"),
    (["--model", "{tiny}", "--image", "{tiny}/config.json"], "is a text model: it cannot take images"),
    (["--model", "{tiny}", "--max-context", "4"], "does not fit the context of 4 tokens"),
    (["--model", "{tiny}", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--model", "{tiny}", "--max-context", "0"], "max_context must be a positive number of tokens"),
])
def test_errors_are_one_clear_line(tiny_phi3, capsys, argv, message):
    argv = [a.format(tiny=tiny_phi3) for a in argv]
    assert main(["generate", "--prompt", "Hi", "--dtype", "float32", *argv]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_bad_image_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    assert main(["generate", "--model", str(B1.parent), "--image", str(bad), "--prompt", "Hi", "--dtype",
                 "float32"]) == 2
    assert "bad.png" in capsys.readouterr().err
