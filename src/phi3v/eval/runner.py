"""Run a task through a model in batches, score it, and re-score saved predictions without a model.

A report is a JSON object: task, model, prompt (the template), metric, overall, categories, metrics (extra
numbers), n, generation settings, and items [{id, question, prediction, answers, score, category, choices, meta}].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import InputError, Phi3VError
from .datasets import Item, read_jsonl
from .tasks import Task

Progress = Callable[[int, int], None]  # (items done, items in all)


def conversation(task: Task, item: Item) -> list[dict]:
    """The one-turn chat an item is asked as; its images ride in the message (tags are prepended by the API)."""
    return [{"role": "user", "content": task.render(item), "images": list(item.images)}]


def batches(task: Task, items: list[Item], batch: int, max_new_tokens: int | None) -> list[tuple[int, list[int]]]:
    """(token budget, item positions) batches: items sorted by budget (then position) and cut into full
    batches, each allowed the largest budget among its items."""
    budgets = [max_new_tokens or task.budget(item) for item in items]
    order = sorted(range(len(items)), key=lambda k: (budgets[k], k))
    return [(max(budgets[k] for k in order[i:i + batch]), order[i:i + batch]) for i in range(0, len(order), batch)]


def _generate(model, convs: list[list[dict]], budget: int) -> list[str]:
    return [c.text for c in model.generate_batch(convs, max_new_tokens=budget, temperature=0)]


def predict(model, task: Task, items: list[Item], batch: int = 8, max_new_tokens: int | None = None,
            progress: Progress | None = None) -> tuple[list[str], dict[int, str]]:
    """Greedy predictions of every item, and {position: error message} for items the model could not take."""
    if batch < 1:
        raise InputError(f"batch must be at least 1, not {batch}")
    preds, errors, done = [""] * len(items), {}, 0
    for budget, ks in batches(task, items, batch, max_new_tokens):
        try:
            for k, text in zip(ks, _generate(model, [conversation(task, items[k]) for k in ks], budget)):
                preds[k] = text
        except Phi3VError:  # one bad item (unreadable image, too long) must not sink its batch: one at a time
            for k in ks:
                try:
                    preds[k] = model.generate(conversation(task, items[k]), max_new_tokens=budget, temperature=0).text
                except Phi3VError as e:
                    errors[k] = str(e)
        done += len(ks)
        if progress:
            progress(done, len(items))
    return preds, errors


def report(task: Task, items: list[Item], predictions: list[str], model: str = "",
           errors: dict[int, str] | None = None, generation: dict | None = None) -> dict:
    """Score predictions (one per item, same order) into a report."""
    scores = task.score(items, predictions)
    summary = task.summarize(items, scores, predictions)
    rows = []
    for k, (item, pred, score) in enumerate(zip(items, predictions, scores)):
        row = {"id": item.id, "question": item.question, "prediction": pred, "answers": item.answers, "score": score,
               "category": item.category, "choices": item.choices, "meta": item.meta}
        if errors and k in errors:
            row["error"] = errors[k]
        rows.append(row)
    return {"task": task.name, "model": model, "prompt": task.prompt, "metric": task.metric,
            "overall": summary["overall"], "categories": summary["categories"], "metrics": summary["metrics"],
            "n": len(items), "generation": generation or {}, "items": rows}


def evaluate(model, task: Task, items: list[Item], batch: int = 8, max_new_tokens: int | None = None,
             progress: Progress | None = None) -> dict:
    """Generate (greedy) and score every item: the report."""
    preds, errors = predict(model, task, items, batch, max_new_tokens, progress)
    generation = {"temperature": 0, "max_new_tokens": max_new_tokens or "task default"}
    return report(task, items, preds, str(getattr(model, "path", "")), errors, generation)


def rescore(task: Task, predictions: dict | list[dict], items: list[Item] | None = None) -> dict:
    """Re-score saved predictions (a report, or [{"id", "prediction"}]) without a model; `items` (the dataset)
    are needed unless the predictions are a full report."""
    rows = predictions["items"] if isinstance(predictions, dict) else predictions
    src = predictions if isinstance(predictions, dict) else {}
    if src.get("task") not in (None, task.name):
        raise InputError(f"the predictions are for task {src['task']!r}, not {task.name!r}; pass --task {src['task']}")
    try:
        by_id = {str(r["id"]): r for r in rows}
    except (KeyError, TypeError) as e:
        raise InputError("each prediction needs an \"id\" and a \"prediction\"") from e
    if items is None:
        if any("answers" not in r for r in rows):
            raise InputError("these predictions carry no answers: pass --data with the dataset to score them against")
        items = [Item(str(r["id"]), r.get("question", ""), list(r["answers"]), [], r.get("category", ""),
                      list(r.get("choices") or []), dict(r.get("meta") or {})) for r in rows]
    else:
        unknown = set(by_id) - {i.id for i in items}
        if unknown:
            raise InputError(f"{len(unknown)} prediction id(s) are not in the dataset (e.g. {sorted(unknown)[0]!r}); "
                             "check --data and --split")
        items = [i for i in items if i.id in by_id]
    preds = [str(by_id[i.id].get("prediction", "")) for i in items]
    errors = {k: by_id[i.id]["error"] for k, i in enumerate(items) if "error" in by_id[i.id]}
    return report(task, items, preds, src.get("model", ""), errors, src.get("generation"))


def load_predictions(path: str | Path) -> dict | list[dict]:
    """A saved report (JSON object with "items") or a JSON-lines file of {"id", "prediction"}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"predictions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "items" in obj:
            return obj
    except json.JSONDecodeError:
        pass
    return read_jsonl(path)


def save(rep: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
