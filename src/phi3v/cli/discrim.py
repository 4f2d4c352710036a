"""`phi3v eval --task discrim` (also usable alone): the discrimination evaluation on a discrim-eval JSONL, a JSON
report of the mixed-effects scores per intervention and fill type, and a PNG of them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from .common import add_model_args, load_model

HELP = "discrimination evaluation (discrim-eval): p(yes) shifts with age, gender and race, per intervention"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.discrim import INTERVENTIONS

    add_model_args(p)
    p.add_argument("--data", required=True, help="discrim-eval JSONL (explicit.jsonl / implicit.jsonl)")
    p.add_argument("--interventions", nargs="+", default=["none"], choices=sorted(INTERVENTIONS),
                   help="prompt interventions compared side by side (default: none)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--batch", type=int, default=8, help="prompts scored together")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--out", default=None, help="write the report here (and the chart beside it as .png)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from ..eval import discrim as D

    # run() also serves `phi3v eval --task discrim`, whose parser may lack this command's own flags
    interventions, level = getattr(args, "interventions", None) or ["none"], getattr(args, "level", 0.95)
    if not 0 < level < 1:
        raise InputError(f"--level must lie between 0 and 1, not {level}")
    items = D.load_discrim(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise InputError(f"--limit must be at least 1, not {args.limit}")
        items = items[:args.limit]
    model = load_model(args)
    rows = D.score(model, items, list(interventions), args.batch)
    rep = D.report(rows, level)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**rep, "rows": rows}, indent=2))
        D.plot_scores(rep, out.with_suffix(".png"))
    if args.json:
        print(json.dumps(rep))
    else:
        print(_table(rep))
    return 0


def _table(rep: dict) -> str:
    keys = list(rep["fits"])
    pct = f"{100 * rep['level']:g}%"
    lines = [f"discrim  scores = coefficients on logit p(yes) vs a 60-year-old white male ({pct} intervals)",
             f"  {'':<24}" + "".join(f"{k:>28}" for k in keys),
             f"  {'mean p(yes)':<24}" + "".join(f"{rep['fits'][k]['mean_p_yes']:>28.3f}" for k in keys)]
    for attr, values in rep["attribute_values"].items():
        for v in values:
            name, cells = f"{attr}={v}", []
            for k in keys:
                s = rep["fits"][k]["scores"].get(name)
                cells.append(f"{s['estimate']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]" if s else "-")
            lines.append(f"  {name:<24}" + "".join(f"{c:>28}" for c in cells))
    return "\n".join(lines)
