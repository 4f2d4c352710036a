"""Benchmark metrics, each exactly as lmms-eval or VLMEvalKit (or the benchmark's own code) computes it.

Every quirk of the reference is kept on purpose and marked with a comment naming where it comes from, so our
numbers can be compared with published ones. Pure functions on strings: no model, no files.
"""

from __future__ import annotations

import math
import random
import re
import string

# ---------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    # lmms-eval chartqa relaxed_correctness: a trailing % divides by 100 (rstrip drops every trailing %); anything
    # Python's float() accepts is a number (so "1,000" and "$5" are not numbers: no stripping of "," or "$")
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: numbers within 5% relative error, otherwise a case-insensitive exact match."""
    pred, gold = _to_float(prediction), _to_float(target)
    # lmms-eval chartqa relaxed_correctness: `target_float` is tested for truth, so a gold 0 falls back to strings
    if pred is not None and gold:
        return abs(pred - gold) / abs(gold) <= max_relative_change
    return prediction.lower() == target.lower()  # lmms-eval chartqa: no strip, no normalisation beyond lower()


# ---------------------------------------------------------------- DocVQA ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) > len(b):
        a, b = b, a
    row = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        prev, row[0] = row[0], j
        for i, ca in enumerate(a, 1):
            prev, row[i] = row[i], min(row[i] + 1, row[i - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question: the best over its answers, 0 below threshold."""
    if not answers:
        return 0.0
    det = " ".join(prediction.strip().lower().split())
    dists = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        # lmms-eval metrics.anls: the length is that of the raw strings, upper-cased (not of the normalised ones)
        length = max(len(answer.upper()), len(prediction.upper()))
        dists.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1 - min(dists)
    return 0.0 if score < threshold else score  # lmms-eval metrics.anls: strictly below 0.5 is 0; 0.5 itself counts


# ---------------------------------------------------------------- VQAv2 / TextVQA (EvalAI answer processing)

# lmms-eval _task_utils/vqa_eval_metric.EvalAIAnswerProcessor.CONTRACTIONS (from mmf), "key value" per line; the
# capitalised keys can never match (the text is lower-cased first) and "somebody'd" maps the wrong way round: kept.
_CONTRACTIONS = dict(line.split() for line in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've
I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am
mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at
shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd|someoned've someone'd've
someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd|thered've there'd've
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've
theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll
whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've
yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've
youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
""".replace("\n", "|").strip("|").split("|"))
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# lmms-eval vqa_eval_metric PERIOD_STRIP: "(?!<=\d)" is a mistyped look-behind (it looks AHEAD for "<="), so a
# period after a digit is stripped too ("5." -> "5"); VLMEvalKit's process_punctuation has the real look-behind.
LMMS_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
VLMEVAL_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")


def process_punctuation(text: str, period_strip: re.Pattern = LMMS_PERIOD_STRIP) -> str:
    """EvalAI punctuation step: drop (or space out) punctuation, then drop periods not inside numbers."""
    out = text
    for p in _PUNCTUATION:
        # EvalAI: the test looks at the ORIGINAL text, and a digit,digit anywhere makes every mark vanish
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # EvalAI / lmms-eval: re.UNICODE is passed as sub()'s `count`, so at most 32 periods are removed
    return period_strip.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """EvalAI: lower-case, number words to digits ("none" -> "0"), drop articles, restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(text: str) -> str:
    """lmms-eval EvalAIAnswerProcessor.__call__: the full normalisation of an answer."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()  # word_tokenize
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _leave_one_out(pred: str, golds: list[str]) -> float:
    if not golds:
        return 0.0
    # VQA accuracy: min(#humans that said it / 3, 1), averaged over the 10 subsets of 9 of the 10 answers
    accs = [min(1.0, sum(g == pred for j, g in enumerate(golds) if j != i) / 3) for i in range(len(golds))]
    return sum(accs) / len(accs)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """lmms-eval textvqa_process_results: both sides fully normalised, leave-one-out VQA accuracy."""
    return _leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def vqav2_accuracy(prediction: str, answers: list[str]) -> float:
    """lmms-eval vqav2_process_results: newlines/tabs to spaces and strip, then only punctuation + digit/article
    (no word_tokenize: commas and "?" are not removed first, "'s" is not split)."""
    def clean(s: str) -> str:
        return process_digit_article(process_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))
    # lmms-eval vqav2: "others" are the answer dicts != this one; answer_ids make them distinct, i.e. by position
    return _leave_one_out(clean(prediction), [clean(a) for a in answers])


# ---------------------------------------------------------------- multiple choice: ScienceQA, AI2D

LETTERS = string.ascii_uppercase


def scienceqa_correct(prediction: str, target: str) -> bool:
    """lmms-eval sqa_process_results ("how llava parses it"): the letter alone, or "X. ..." with a capital X."""
    pred, target = prediction.strip(), target.strip().lower()
    if pred.lower() == target:
        return True
    # lmms-eval sqa: the pattern ^[A-Z]\. is tested on the un-lowered prediction, so "b. cat" is wrong
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0].lower() == target
    return False


_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def ai2d_correct(prediction: str, target: str) -> bool:
    """lmms-eval ai2d: MultiChoiceRegexFilter keeps "X" of a leading "X.", else the whole response; then
    exact_match with ignore_case and ignore_punctuation (and no whitespace strip)."""
    m = _AI2D_LETTER.match(prediction)
    pred = m.group(1) if m else prediction
    return pred.lower().translate(_NO_PUNCT) == target.lower().translate(_NO_PUNCT)


# ---------------------------------------------------------------- MMMU (MMMU/mmmu/utils/eval_utils.py)

MMMU_SEED = 42  # MMMU eval_utils: random.seed(42) at import, one stream for the whole run


def mmmu_rng() -> random.Random:
    return random.Random(MMMU_SEED)


def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict[str, str],
                                rng: random.Random) -> str:
    """MMMU's answer parsing: "(A)", then " A ", then (if over 5 words) option text, else a seeded random letter;
    several candidates -> the one mentioned last."""
    for ch in [",", ".", "!", "?", ";", ":", "'"]:  # MMMU: strip() of each mark in turn, in this order
        response = response.strip(ch)
    response = " " + response + " "
    by_index, bracketed = True, False
    cands = [c for c in all_choices if f"({c})" in response]
    if cands:
        bracketed = True
    else:
        cands = [c for c in all_choices if f" {c} " in response]
    if not cands and len(response.split()) > 5:
        cands = [k for k, ans in index2ans.items() if ans.lower() in response.lower()]
        by_index = not cands
    if not cands:
        return rng.choice(all_choices)  # MMMU: random.choice from the seeded global stream
    if len(cands) == 1:
        return cands[0]
    if by_index:
        pos = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in cands]
    else:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    return cands[pos.index(max(pos))]  # MMMU: np.argmax, the first of equal maxima


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def mmmu_normalize_str(s: str) -> list:
    """MMMU normalize_str: a number becomes [float rounded to 2 places]; a string is lowered, and a single
    character is padded with a space on either side (to avoid trivial matches)."""
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def mmmu_extract_numbers(s: str) -> list[str]:
    return _NUM_COMMAS.findall(s) + _NUM_SCI.findall(s) + _NUM_SIMPLE.findall(s)


def parse_open_response(response: str) -> list:
    """MMMU parse_open_response: the shortest tail after a key phrase ("is ", "so ", "=" in the last sentence...)
    of each sentence, plus the numbers in them, normalised; a set (order does not matter to eval_open)."""
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)  # MMMU: after lower(), "(?=[A-Z])" only splits on newlines
    keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    found = []
    for i, resp in enumerate(subs):
        if i == len(subs) - 1:
            keys = keys + ["="]  # MMMU: extend() in the loop; the last sentence may be an equation
        shortest = None
        for key in keys:
            if key in resp:
                tail = resp.split(key)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            found.append(shortest)
    if not found:
        found = [response]
    preds = list(found)
    for resp in found:
        preds.extend(mmmu_extract_numbers(resp))
    out = []
    for p in preds:
        out.extend(mmmu_normalize_str(p))
    return list(dict.fromkeys(out))


def mmmu_eval_open(answers: list[str], parsed: list) -> bool:
    """MMMU eval_open: a parsed string is right if it CONTAINS a normalised answer string; a number if equal."""
    norm = [n for a in answers for n in mmmu_normalize_str(a)]
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(n, str) and n in pred for n in norm):
                return True
        elif pred in norm:
            return True
    return False


# ---------------------------------------------------------------- MMBench (VLMEvalKit utils/matching_util.py)

_REJECTIONS = ["Sorry, I can't help with images of people yet.", "I can't process this file.",
               "I'm sorry, but without the image provided", "Cannot determine the answer"]
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: dict[str, str]) -> str | bool:
    """VLMEvalKit can_infer_option: exactly one option letter as a word near the end, or 'Z' for a refusal."""
    if "Failed to obtain answer via API" in answer:
        return False
    if any(r in answer for r in _REJECTIONS):
        return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(c in splits for c in choices)
    if count == 1:
        for ch in choices:
            # VLMEvalKit: the letter must be among the last 4 words (index > len - 5)
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and "Z" in splits:
        return "Z"
    m = _VERBOSE_ANSWER.search(answer or "")
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return False


def can_infer_text(answer: str, choices: dict[str, str]) -> str | bool:
    """VLMEvalKit can_infer_text: exactly one option's text inside a not-too-long answer."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer: str, choices: dict[str, str]) -> str | bool:
    """VLMEvalKit's exact-matching answer extraction (no judge model): an option letter, else an option text."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def mmbench_group(index: int) -> int:
    return int(index % 1e6)  # VLMEvalKit mcq_circular_eval: g_index = int(x % 1e6); rotations add k * 1e6


def circular_hits(indices: list[int], hits: list[bool]) -> dict[int, bool]:
    """VLMEvalKit circular evaluation: group -> right only if every rotation in it is right; a group counts only
    when its original question (index == group) is present."""
    groups: dict[int, bool] = {}
    for idx, hit in zip(indices, hits):
        g = mmbench_group(idx)
        groups[g] = groups.get(g, True) and bool(hit)
    present = set(indices)
    return {g: h for g, h in groups.items() if g in present}


# ---------------------------------------------------------------- POPE


def yes_or_no(output: str) -> str:
    """VLMEvalKit YOrN_Extraction: 'Yes' / 'No' when exactly one of the words appears, else 'Unknown'."""
    words = process_punctuation(output.lower(), VLMEVAL_PERIOD_STRIP).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def pope_scores(extracted: list[str], answers: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes = positive) and the yes-ratio of the predictions."""
    n = len(answers)
    gold = [a.lower() == "yes" for a in answers]
    pred = [e.lower() == "yes" for e in extracted]  # VLMEvalKit POPE_rating: 'Unknown' counts as a "no"
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum(p and not g for g, p in zip(gold, pred))
    fn = sum(g and not p for g, p in zip(gold, pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(e.lower() == a.lower() for e, a in zip(extracted, answers)) / n if n else 0.0
    # POPE's own evaluate.py: yes_ratio = share of "yes" PREDICTIONS (lmms-eval's pope_yes_ratio counts the
    # ground truth instead; we give that one as gold_yes_ratio)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / n if n else 0.0, "gold_yes_ratio": sum(gold) / n if n else 0.0}


# ---------------------------------------------------------------- the synthetic set (phi3v synth)

STRUCTURED_KINDS = ("markdown", "json")


def synth_normalize(text: str) -> str:
    """Strip, casefold, collapse whitespace runs to one space, drop one trailing period."""
    text = " ".join(text.strip().casefold().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def structured_normalize(text: str) -> str:
    """Markdown / JSON answers: exact text, except trailing whitespace on each line and blank lines at either end."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def synth_correct(prediction: str, answers: list[str], kind: str = "") -> bool:
    norm = structured_normalize if kind in STRUCTURED_KINDS else synth_normalize
    return any(norm(prediction) == norm(a) for a in answers)


def mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else 0.0
