"""Does the perspective reformulation let `scip_refit` prove wider rows? Both formulations on the same rows.

Real SmolLM2 sub-layers of 24, 32 and 48 inputs (benchmarks/instances/smollm2, the first INSTANCES of each
width, 2 rows each) and synthetic 32-input rows (the test families), each started from the default incumbent
(Wanda refined by `refit_swaps`), `--row-time-limit` seconds per row. Per row: proven (within 1e-6 of
SCIP's bound), seconds, the bound's relative gap, and whether the bound lies below the better of the two
formulations' solutions (each checks the other); one JSON line per (rows, target, formulation), then a
markdown table.

    python benchmarks/experiments/scip_refit_perspective.py --row-time-limit 30 --workers 2 --out X.json

Wider rows (96 and 128 inputs, `sparseswaps extract --blocks 15 --widths 96,128`), perspective only:

    python benchmarks/experiments/scip_refit_perspective.py --folder benchmarks/instances/smollm2_wide \
        --widths 96,128 --formulations perspective --no-synthetic --row-time-limit 60 --out X.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import sparseswaps as ss  # noqa: E402
from conftest import make_problem  # noqa: E402
from sparseswaps.instances import load_instances  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402


def instances(folder: Path, widths: list[int], count: int, targets: list[str], synthetic: bool):
    """(label, target, problem): `count` real sub-layers of each width, then synthetic 32-input rows."""
    real = load_instances(folder)
    for d in widths:
        for target in targets:
            for instance in [i for i in real if i.d == d][:count]:
                yield f"SmolLM2 real d={d}", target, instance.problem(target)
    for family in ("correlated", "outliers") if synthetic else ():
        for target in targets:
            spec = {"pattern": target} if ":" in target else {"sparsity": float(target)}
            yield f"synthetic {family} d=32", target, make_problem(family, rows=2, d=32, seed=0, tokens=128, **spec)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row-time-limit", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--widths", default="24,32,48")
    parser.add_argument("--instances", type=int, default=4, help="real sub-layers per width (2 rows each)")
    parser.add_argument("--targets", default="0.5,2:4")
    parser.add_argument("--folder", type=Path, default=ROOT / "benchmarks" / "instances" / "smollm2",
                        help="real instances (e.g. benchmarks/instances/smollm2_wide for 96 and 128 inputs)")
    parser.add_argument("--formulations", default="big-M,perspective",
                        help="big-M, perspective or both; with one, a bound is checked against its own solution")
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True,
                        help="also the synthetic 32-input rows")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    perspectives = formulations(args.formulations, parser)
    pooled: dict[tuple, dict] = {}
    for label, target, problem in instances(args.folder, [int(d) for d in args.widths.split(",")], args.instances,
                                             args.targets.split(","), args.synthetic):
        start = ss.solve(problem, ["wanda", "refit_swaps"]).mask
        results = {perspective: ss.solve(problem, "scip_refit", warm_start=start, row_time_limit=args.row_time_limit,
                                         workers=args.workers, perspective=perspective) for perspective in perspectives}
        best = functools.reduce(torch.minimum, (result.row_weight_objective for result in results.values()))
        for perspective, result in results.items():
            gap = (result.row_weight_objective - result.row_weight_bound) / result.row_weight_objective
            entry = pooled.setdefault((label, target, perspective), {"gaps": [], "seconds": 0.0, "bound_valid": 0})
            entry["gaps"] += gap.tolist()
            entry["seconds"] += result.runtime_s
            # each bound must lie below the other formulation's mask too (its least-squares error), where both ran
            entry["bound_valid"] += int((result.row_weight_bound <= best * (1 + 1e-9)).sum())
            print(f"{label} {target} perspective={perspective}: gaps {[f'{g:.1e}' for g in gap.tolist()]}, "
                  f"{result.runtime_s:.1f} s", flush=True)
    rows = []
    for (label, target, perspective), entry in pooled.items():
        gaps = entry["gaps"]
        rows.append({"rows": label, "target": target, "perspective": perspective, "count": len(gaps),
                     "proven": sum(g <= 1e-6 for g in gaps), "mean_gap": statistics.fmean(gaps),
                     "max_gap": max(gaps), "bound_below_both": entry["bound_valid"], "seconds_per_row": entry["seconds"] / len(gaps),
                     "row_time_limit": args.row_time_limit})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"rows": rows, "environment": environment()}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows))


def formulations(text: str, parser: argparse.ArgumentParser) -> list[bool]:
    """The `perspective` option of each named formulation, in the order given."""
    names = {"big-M": False, "perspective": True}
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown or not chosen:
        parser.error(f"--formulations takes big-M and/or perspective, comma-separated; got {text!r}")
    return [names[name] for name in dict.fromkeys(chosen)]


def markdown(rows: list[dict]) -> str:
    lines = ["| rows | target | formulation | proven | mean gap | max gap | bound below both | wall s per row |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['rows']} | {row['target']} | {'perspective' if row['perspective'] else 'big-M'} | "
                     f"{row['proven']}/{row['count']} | {row['mean_gap']:.2e} | {row['max_gap']:.2e} | "
                     f"{row['bound_below_both']}/{row['count']} | "
                     f"{row['seconds_per_row']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
