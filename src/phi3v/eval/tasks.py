"""Tasks: a loader, a prompt and a metric per benchmark (nanochat `tasks/` style), and a registry by name.

Prompts follow lmms-eval's default (non model-specific) templates; `Task.prompt` is the template recorded in
the report.
"""

from __future__ import annotations

from collections import defaultdict

from ..errors import InputError, Phi3VError
from . import datasets as ds
from . import metrics as M
from .datasets import Item
from .discrim import QUESTION_SUFFIX, load_discrim

VQA_PROMPT = "\nAnswer the question using a single word or phrase."  # lmms-eval docvqa/textvqa/pope post_prompt
MC_PROMPT = "\nAnswer with the option's letter from the given choices directly."  # lmms-eval sqa/ai2d/mmbench


def options_text(choices: list[str]) -> str:
    return "\n".join(f"{ds.LETTERS[i]}. {c}" for i, c in enumerate(choices))


def by_category(items: list[Item], scores: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for item, s in zip(items, scores):
        if item.category:
            groups[item.category].append(s)
    return {c: M.mean(v) for c, v in sorted(groups.items())}


class Task:
    """A benchmark: `load` items, `render` each one's prompt, `score` predictions, `summarize` the scores."""

    name = ""
    metric = ""
    prompt = "{question}"
    max_new_tokens = 16
    split = "test"

    loader = None  # datasets.load_*(path, split)

    def load(self, path, split: str | None = None) -> list[Item]:
        """The items of the dataset at path (a file or folder in its published layout)."""
        try:
            return type(self).loader(path, self.split if split is None else split)
        except Phi3VError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as e:  # a file that is not in this layout
            raise InputError(f"{path} does not look like {self.name} data in its published layout "
                             f"({type(e).__name__}: {e})") from e

    def render(self, item: Item) -> str:
        return self.prompt.format(question=item.question)

    def budget(self, item: Item) -> int:
        """New tokens allowed for this item's answer."""
        return self.max_new_tokens

    def score_one(self, item: Item, prediction: str) -> float:
        raise NotImplementedError

    def score(self, items: list[Item], predictions: list[str]) -> list[float]:
        return [float(self.score_one(i, p)) for i, p in zip(items, predictions)]

    def summarize(self, items: list[Item], scores: list[float], predictions: list[str]) -> dict:
        """{"overall", "categories", "metrics"} from the per-item scores."""
        return {"overall": M.mean(scores), "categories": by_category(items, scores), "metrics": {}}


class ChartQA(Task):
    name, metric, split = "chartqa", "relaxed accuracy (5%)", "test"
    prompt = "{question}\nAnswer the question with a single word."  # lmms-eval chartqa post_prompt

    loader = staticmethod(ds.load_chartqa)

    def score_one(self, item, prediction):
        return M.relaxed_correctness(prediction, item.answers[0]) if item.answers else False


class DocVQA(Task):
    name, metric, split, max_new_tokens = "docvqa", "ANLS", "val", 32
    prompt = "{question}" + VQA_PROMPT

    loader = staticmethod(ds.load_docvqa)

    def score_one(self, item, prediction):
        return M.anls(prediction, item.answers)


class TextVQA(Task):
    name, metric, split = "textvqa", "VQA accuracy (EvalAI)", "val"
    prompt = "{question.capitalize()}" + VQA_PROMPT  # lmms-eval textvqa_doc_to_text: question.capitalize()

    loader = staticmethod(ds.load_textvqa)

    def render(self, item):
        return item.question.capitalize() + VQA_PROMPT  # str.capitalize also lower-cases the rest, as lmms-eval

    def score_one(self, item, prediction):
        return M.textvqa_accuracy(prediction, item.answers)


class ScienceQA(Task):
    name, metric, split = "scienceqa", "accuracy (lmms-eval sqa parsing)", "test"
    prompt = "Context: {hint}\n{question}\n{A. choice\\n...}" + MC_PROMPT  # the Context line only with a hint

    loader = staticmethod(ds.load_scienceqa)

    def render(self, item):
        hint = item.meta.get("hint")
        context = f"Context: {hint}\n" if hint else ""
        return f"{context}{item.question}\n{options_text(item.choices)}{MC_PROMPT}"

    def score_one(self, item, prediction):
        return M.scienceqa_correct(prediction, item.answers[0])


class AI2D(Task):
    name, metric, split = "ai2d", "accuracy (lmms-eval ai2d filter + exact match)", "test"
    prompt = "{question}\n{A. choice\\n...}" + MC_PROMPT

    loader = staticmethod(ds.load_ai2d)

    def render(self, item):
        return f"{item.question}\n{options_text(item.choices)}{MC_PROMPT}"

    def score_one(self, item, prediction):
        return M.ai2d_correct(prediction, item.answers[0])


class MMMU(Task):
    name, metric, split, max_new_tokens = "mmmu", "accuracy (MMMU answer parsing)", "validation", 128
    prompt = ("multiple-choice: {question}\n{A. choice\\n...}\n\nAnswer with the option's letter from the given "
              "choices directly. | open: {question}\n\nAnswer the question using a single word or phrase.")

    loader = staticmethod(ds.load_mmmu)

    def render(self, item):
        if item.meta.get("question_type") == "multiple-choice":  # lmms-eval mmmu construct_prompt
            return f"{item.question}\n{options_text(item.choices)}\n\n{MC_PROMPT.strip()}"
        return f"{item.question}\n\n{VQA_PROMPT.strip()}"

    def score(self, items, predictions):
        rng = M.mmmu_rng()  # one seeded stream over the run, in item order, as MMMU's eval_utils
        scores = []
        for item, pred in zip(items, predictions):
            if item.meta.get("question_type") == "multiple-choice":
                letters = list(ds.LETTERS[:len(item.choices)])
                parsed = M.parse_multi_choice_response(pred, letters, dict(zip(letters, item.choices)), rng)
                scores.append(float(parsed in item.answers))  # MMMU eval_multi_choice: exact letter
            else:
                scores.append(float(M.mmmu_eval_open(item.answers, M.parse_open_response(pred))))
        return scores


class MMBench(Task):
    name, metric, split, max_new_tokens = "mmbench", "circular accuracy (VLMEvalKit exact matching)", "dev", 32
    prompt = "{hint} {question} There are several options:\n{A. choice\\n...}" + MC_PROMPT  # lmms-eval mmbench_en

    loader = staticmethod(ds.load_mmbench)

    def render(self, item):
        options = "There are several options:\n" + options_text(item.choices)
        hint = item.meta.get("hint")
        text = f"{hint} {item.question} {options}" if hint else f"{item.question} {options}"
        return text + MC_PROMPT

    def score_one(self, item, prediction):
        choices = {ds.LETTERS[i]: c for i, c in enumerate(item.choices)}
        return bool(item.answers) and M.can_infer(prediction, choices) == item.answers[0]

    def summarize(self, items, scores, predictions):
        groups = M.circular_hits([i.meta["index"] for i in items], [s > 0 for s in scores])
        main = [i for i in items if i.meta["index"] in groups]  # the original question stands for its group
        hits = [float(groups[i.meta["index"]]) for i in main]
        return {"overall": M.mean(hits), "categories": by_category(main, hits),
                "metrics": {"groups": len(main), "vanilla_accuracy": M.mean(scores)}}


class POPE(Task):
    name, metric, split, max_new_tokens = "pope", "F1 (yes = positive; VLMEvalKit yes/no extraction)", "", 128
    prompt = "{question}" + VQA_PROMPT  # lmms-eval pope: question.strip() + post_prompt

    loader = staticmethod(ds.load_pope)

    def render(self, item):
        return item.question.strip() + VQA_PROMPT

    def score_one(self, item, prediction):
        return M.yes_or_no(prediction).lower() == item.answers[0]

    def summarize(self, items, scores, predictions):
        def rate(sub):
            return M.pope_scores([M.yes_or_no(p) for _, p in sub], [i.answers[0] for i, _ in sub])
        pairs = list(zip(items, predictions))
        overall = rate(pairs)
        cats = sorted({i.category for i in items if i.category})
        return {"overall": overall["f1"],  # VLMEvalKit POPE_rating: "Overall" is the F1 score
                "categories": {c: rate([x for x in pairs if x[0].category == c])["f1"] for c in cats},
                "metrics": overall}


class Synth(Task):
    name, metric, split = "synth", "exact match (normalised; Markdown/JSON exact up to line-end spaces)", "test"
    prompt = "{question}"  # as the training conversations of `phi3v synth` ask it
    slack = 16  # tokens beyond the answer: room for spaces, a newline or a final period
    max_new_tokens = 512

    loader = staticmethod(ds.load_synth)

    def budget(self, item):
        """Every token is at least one byte, so an output longer than the longest answer's UTF-8 bytes plus
        `slack` tokens cannot match it: stopping there changes no score, and an untrained model stops early."""
        longest = max((len(a.encode()) for a in item.answers), default=0)
        return min(self.max_new_tokens, longest + self.slack)

    def score_one(self, item, prediction):
        return M.synth_correct(prediction, item.answers, item.meta.get("kind", ""))


class Discrim(Task):
    """The discrimination evaluation (eval/discrim.py): read from the yes/no logits, not generated, so `phi3v eval`
    hands it to `phi3v.cli.discrim.run`; its items are discrim-eval rows (DiscrimItem), not Items."""

    name, metric, split = "discrim", "mixed-effects discrimination scores on logit p(yes)", ""
    prompt = "{question}" + QUESTION_SUFFIX
    generates = False

    def load(self, path, split: str | None = None):
        return load_discrim(path)


TASKS: dict[str, type[Task]] = {t.name: t for t in (ChartQA, DocVQA, TextVQA, ScienceQA, AI2D, MMMU, MMBench, POPE,
                                                    Synth, Discrim)}


def get_task(name: str) -> Task:
    """The task registered under name (chartqa, docvqa, textvqa, scienceqa, ai2d, mmmu, mmbench, pope, synth,
    discrim)."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]()
