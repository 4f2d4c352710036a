"""Golden values for every metric, worked out by hand on examples that exercise the references' quirks."""

import random

import pytest

from phi3v.eval import metrics as M


# ---- ChartQA relaxed accuracy (lmms-eval chartqa)
@pytest.mark.parametrize("pred, gold, ok", [
    ("12", "12.5", True),       # |12 - 12.5| / 12.5 = 0.04
    ("11.8", "12.5", False),    # 0.056
    ("5.25", "5", True),        # exactly 5%: <= counts
    ("45%", "0.45", True),      # a trailing % divides by 100
    ("45", "45%", False),       # 45 vs 0.45
    ("1,000", "1000", False),   # no stripping of ","
    ("$5", "5", False),         # nor of "$"
    ("Yes", "yes", True),       # case-insensitive strings
    (" yes", "yes", False),     # no strip
    ("0", "0", True),           # gold 0 is falsy: compared as strings ...
    ("0.0", "0", False),        # ... so 0.0 != "0"
])
def test_relaxed_correctness(pred, gold, ok):
    assert M.relaxed_correctness(pred, gold) is ok


# ---- DocVQA ANLS (lmms-eval metrics.anls)
def test_anls_values():
    assert M.anls("Hello  World ", ["hello world"]) == 1.0
    assert M.anls("abcd", ["abce"]) == 0.75
    assert M.anls("ab", ["abcd"]) == 0.5          # exactly the threshold: kept
    assert M.anls("a", ["abcd"]) == 0.0           # 0.25 < 0.5 -> 0
    assert M.anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)  # best answer
    assert M.anls("ac", ["  ab  "]) == pytest.approx(5 / 6)  # length from the raw gold (6), not "ab" (2)
    assert M.anls("strasse", ["straße"]) == pytest.approx(5 / 7)  # "STRASSE" is 7 long; distance 2
    assert M.anls("x", []) == 0.0


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("flaw", "lawn") == 2


# ---- EvalAI answer normalisation, VQA accuracy
@pytest.mark.parametrize("text, norm", [
    ("Two dogs.", "2 dogs"),
    ("The cat's toy", "cat 's toy"),
    ("dont", "don't"),
    ("3.5", "3.5"),
    ("5.", "5"),                 # lmms-eval's mistyped look-behind strips a period after a digit
    ("red-white", "red white"),  # no space beside "-": replaced by a space
    ("red - white", "red white"),
    ("None", "0"),
    ("an apple, a pear?", "apple pear"),
])
def test_evalai_normalize(text, norm):
    assert M.evalai_normalize(text) == norm


def test_process_punctuation_quirks():
    assert M.process_punctuation("a/b") == "a b"
    assert M.process_punctuation("1,5 a/b") == "15 ab"  # a digit,digit anywhere: every mark is removed
    assert M.process_punctuation("x." * 40) == "x" * 32 + "x." * 8  # re.UNICODE passed as count: 32 periods
    assert M.process_punctuation("5.", M.VLMEVAL_PERIOD_STRIP) == "5."  # VLMEvalKit's real look-behind


def test_textvqa_accuracy():
    answers = ["two", "two", "2"] + ["three"] * 7
    assert M.textvqa_accuracy("2", answers) == pytest.approx(0.9)  # 3 subsets see 2 matches, 7 see 3
    assert M.textvqa_accuracy("Three.", answers) == 1.0
    assert M.textvqa_accuracy("four", answers) == 0.0
    assert M.textvqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)  # 9 subsets x 1/3, one x 0


def test_vqav2_skips_word_tokenize():
    assert M.textvqa_accuracy("dog 's", ["dog's"] * 10) == 1.0  # "'s" -> " 's" on both sides
    assert M.vqav2_accuracy("dog 's", ["dog's"] * 10) == 0.0
    assert M.vqav2_accuracy("Two\n", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


# ---- ScienceQA and AI2D parsing (lmms-eval)
@pytest.mark.parametrize("pred, ok", [
    ("B", True), ("b", True), (" B ", True), ("B. cat", True),
    ("b. cat", False), ("(B)", False), ("The answer is B.", False), ("C. B", False),
])
def test_scienceqa(pred, ok):
    assert M.scienceqa_correct(pred, "B") is ok


@pytest.mark.parametrize("pred, ok", [
    ("B", True), ("b", True), ("B.", True), (" B. dog", True), ("(B)", True),
    (" B", False), ("B) dog", False), ("The answer is B", False),
])
def test_ai2d(pred, ok):
    assert M.ai2d_correct(pred, "B") is ok


# ---- MMMU answer parsing (MMMU/mmmu/utils/eval_utils.py)
INDEX2ANS = {"A": "red apple", "B": "green pear", "C": "blue sky", "D": "cat"}


@pytest.mark.parametrize("resp, letter", [
    ("(B)", "B"),
    ("The answer is (C).", "C"),
    ("A or (B)?", "B"),                            # brackets first
    ("B", "B"),
    ("B.", "B"),                                   # trailing marks stripped
    ("'D'", "D"),
    ("I think C is right, not D", "D"),            # several: the last one mentioned
    ("(A) no wait (B)", "B"),
    ("It is definitely the green pear in the picture", "B"),  # over 5 words: option text
])
def test_mmmu_multi_choice(resp, letter):
    assert M.parse_multi_choice_response(resp, list("ABCD"), INDEX2ANS, M.mmmu_rng()) == letter


def test_mmmu_random_fallback_is_one_seeded_stream():
    rng = M.mmmu_rng()
    got = [M.parse_multi_choice_response("no idea", list("ABCD"), INDEX2ANS, rng) for _ in range(3)]
    ref = random.Random(42)
    assert got == [ref.choice(list("ABCD")) for _ in range(3)] == ["A", "A", "C"]


def test_mmmu_open():
    parsed = M.parse_open_response("The answer is 3,000.")
    assert sorted(parsed) == [0.0, 3000.0]  # "3,000" and the simple pattern's "000"
    assert M.mmmu_eval_open(["3000"], parsed)
    assert M.mmmu_eval_open(["Paris"], M.parse_open_response("It is paris"))
    assert not M.mmmu_eval_open(["b"], M.parse_open_response("abc"))  # one letter is padded: " b", "b "
    assert M.mmmu_eval_open(["2.5"], M.parse_open_response("so x = 2.499"))  # rounded to 2 places


# ---- MMBench (VLMEvalKit exact matching + circular evaluation)
CHOICES = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize("answer, got", [
    ("B", "B"),
    ("The answer is B.", "B"),
    ("A dog", "A"),                   # "A" read as the option letter
    ("dog", "B"),                     # option text
    ("the dog and the cat", False),   # two option texts
    ("B is wrong, the right answer must be C", False),
    ("B at first glance, but on reflection it is really not that at all", False),  # letter not in the last 4
    ("Cannot determine the answer", "Z"),
    ("Z", "Z"),
    ("The correct answer is **C**", "C"),
])
def test_can_infer(answer, got):
    assert M.can_infer(answer, dict(CHOICES)) == got


def test_circular_groups():
    indices = [1, 1_000_001, 2_000_001, 2, 1_000_002, 3_000_005]
    hits = [True, True, True, True, False, True]
    assert M.circular_hits(indices, hits) == {1: True, 2: False}  # group 5 has no original question


# ---- POPE
@pytest.mark.parametrize("out, got", [
    ("Yes.", "Yes"), ("No, there is not.", "No"), ("yes and no", "Unknown"), ("Yesterday", "Unknown"),
    ("YES!", "Yes"),
])
def test_yes_or_no(out, got):
    assert M.yes_or_no(out) == got


def test_pope_scores():
    s = M.pope_scores(["Yes", "Yes", "No", "Unknown", "No"], ["yes", "no", "yes", "yes", "no"])
    assert s["accuracy"] == pytest.approx(0.4)
    assert s["precision"] == pytest.approx(0.5)     # tp 1, fp 1
    assert s["recall"] == pytest.approx(1 / 3)      # fn 2 (a "No" and an "Unknown")
    assert s["f1"] == pytest.approx(0.4)
    assert s["yes_ratio"] == pytest.approx(0.4)
    assert s["gold_yes_ratio"] == pytest.approx(0.6)


# ---- the synthetic set
def test_synth_match():
    assert M.synth_correct("  The  Large  Latte. ", ["the large latte"])
    assert M.synth_correct("$4.50.", ["$4.50"])
    assert not M.synth_correct("4.5", ["$4.50"])
    assert M.synth_correct("STRASSE", ["straße"])   # casefold, not lower
    assert M.synth_correct("3", ["three", "3"])
    md = "| a | b |\n|---|---|\n| 1 | 2 |"
    assert M.synth_correct("| a | b |  \n|---|---|\n| 1 | 2 |\n", [md], "markdown")
    assert not M.synth_correct("| A | b |\n|---|---|\n| 1 | 2 |", [md], "markdown")
    assert not M.synth_correct("|a|b|\n|---|---|\n|1|2|", [md], "markdown")
    assert M.synth_correct('[{"city": "Oslo"}]  ', ['[{"city": "Oslo"}]'], "json")
