"""`phi3v eval`: score a model on a benchmark (or re-score saved predictions) and write a JSON report + PNG chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError
from .common import add_model_args, load_model

HELP = "evaluate a model on a benchmark (chartqa, docvqa, textvqa, scienceqa, ai2d, mmmu, mmbench, pope, synth)"


def add_arguments(p) -> None:
    from ..eval.tasks import TASKS

    add_model_args(p)  # not used with --predictions, which re-scores without a model
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", default=None, help="the dataset: a file or folder in the layout it is published in")
    p.add_argument("--split", default=None, help="dataset split (default: the task's usual evaluation split)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch", type=int, default=8, help="conversations generated together")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (as lmms-eval)")
    p.add_argument("--predictions", default=None,
                   help='re-score a saved report or a jsonl of {"id", "prediction"} (no model needed)')
    p.add_argument("--out", default=None, help="write the report here (and the chart beside it as .png)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--interventions", nargs="+", default=None,
                   help="discrim only: prompt interventions compared side by side (default: none)")
    p.add_argument("--level", type=float, default=0.95, help="discrim only: confidence level of the intervals")


def run(args) -> int:
    from ..eval import runner
    from ..eval.plots import bar_chart
    from ..eval.tasks import get_task

    if args.task == "discrim":  # p(yes) from the logits and a mixed-effects fit, not generated answers
        from . import discrim

        return discrim.run(args)
    task = get_task(args.task)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, not {args.limit}")
    items = task.load(args.data, args.split) if args.data else None
    if items is not None and args.limit:
        items = items[:args.limit]
    if args.predictions:
        rep = runner.rescore(task, runner.load_predictions(args.predictions), items)
    else:
        if items is None:
            raise InputError("give --data (or --predictions FILE to re-score saved predictions)")
        model = load_model(args)
        with _Bar(len(items), task.name) as bar:
            rep = runner.evaluate(model, task, items, args.batch, args.max_new_tokens, progress=bar.update)
    if args.out:
        out = runner.save(rep, args.out)
        bar_chart(rep, out.with_suffix(".png"))
    summary = {k: v for k, v in rep.items() if k != "items"}
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(_table(summary))
        if args.out:
            print(f"report: {args.out}  chart: {Path(args.out).with_suffix('.png')}")
    return 0


def _table(s: dict) -> str:
    lines = [f"{s['task']}  {s['metric']}  n={s['n']}", f"  {'overall':<28} {100 * s['overall']:6.2f}"]
    lines += [f"  {str(k)[:28]:<28} {100 * v:6.2f}" for k, v in s["categories"].items()]
    lines += [f"  {k:<28} {100 * v:6.2f}" if isinstance(v, float) else f"  {k:<28} {v}"
              for k, v in s["metrics"].items()]
    return "\n".join(lines)


class _Bar:
    """A tqdm progress bar on stderr (a no-op without tqdm)."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="q", file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
