"""Optimality gaps: run solvers over instance sets, record every result as a JSONL line, derive proven
optima, and render tables and plots from the JSONL alone (so they can be regenerated, never edited).

Solver specs: a name, optionally with options, e.g. "scip:diagonal_shift=true" or "highs:method=qp_bound".
The harness option max_d=N skips instances wider than N for that spec.
"""
from __future__ import annotations

import inspect
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import write_json_atomic, write_text_atomic
from .errors import UserError
from .instances import Instance
from .registry import get_solver, parse_option_values, solve

OPTIMAL_TOLERANCE = 1e-9


def parse_spec(spec: str) -> tuple[str, dict, int | None]:
    """"name:key=value:key=value" -> (name, options, max_d)."""
    name, *pairs = spec.split(":")
    options = parse_option_values(pairs, f"solver spec {spec!r}")
    get_solver(name)
    return name, options, options.pop("max_d", None)


def run_gaps(instances: list[Instance], specs: list[str], targets: list[str], time_limit: float | None,
             jsonl: Path, environment: dict, executor: str = "process") -> int:
    """Append one line per (instance, target, solver spec) not yet in `jsonl`; returns how many ran. The
    exact solvers' rows run on `executor` (a process pool, or Ray): the records do not depend on it."""
    parsed = {spec: parse_spec(spec) for spec in specs}
    done = {(r["instance"], r["target"], r["solver"]) for r in read_jsonl(jsonl, repair=True)}
    todo = [(inst, target, spec) for inst in instances for target in targets for spec in specs
            if (inst.name, target, spec) not in done and _applies(inst, target, parsed[spec])]
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for inst, target, spec in tqdm(todo, desc="gaps", unit="run"):
        name, options, _ = parsed[spec]
        problem = inst.problem(target)
        result = solve(problem, name, **_time_options(name, time_limit), **_executor_option(name, executor), **options)
        record = {"instance": inst.name, "kind": inst.meta["kind"], "family": inst.meta.get("family"),
                  "layer": inst.meta.get("layer"), "d": inst.d, "rows": problem.rows, "target": target,
                  "solver": spec, "termination": result.termination.value,
                  "row_objective": result.row_objective.tolist(),
                  "row_bound": None if result.row_bound is None else result.row_bound.tolist(),
                  "row_status": result.extra.get("row_status"), "runtime_s": result.runtime_s,
                  "seconds_per_row": result.runtime_s / problem.rows, "time_limit": time_limit,
                  "solver_version": result.solver_version, **environment}
        with open(jsonl, "a") as handle:   # one complete line per run: an interruption loses at most one
            handle.write(json.dumps(record) + "\n")
    return len(todo)


def _takes(name: str, option: str) -> bool:
    return option in inspect.signature(get_solver(name).solve).parameters


def _executor_option(name: str, executor: str) -> dict:
    """Solvers that spread rows over workers take the executor; the others run in this process."""
    return {"executor": executor} if executor != "process" and _takes(name, "executor") else {}


def _time_options(name: str, time_limit: float | None) -> dict:
    """The harness's limit is per row: exact solvers take it as row_time_limit, others as their budget."""
    if time_limit is None:
        return {}
    return {"row_time_limit" if _takes(name, "row_time_limit") else "time_limit": time_limit}


def _applies(inst: Instance, target: str, parsed) -> bool:
    name, _, max_d = parsed
    if max_d is not None and inst.d > max_d:
        return False
    if name == "bruteforce":
        from sparseswaps.solvers.bruteforce import MAX_D
        if inst.d > MAX_D:
            return False
    if ":" in target and inst.d % int(target.split(":")[1]):
        return False
    return True


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Every complete record. A last line without its newline is a write a kill cut short: it is left out
    (and, with `repair`, cut off the file, so the next append starts on a line of its own). Any other line
    that does not parse is damage: an error naming it."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    complete, torn = lines[:-1], lines[-1]
    if torn and repair:
        with open(path, "r+") as handle:
            handle.truncate(len(text.encode()) - len(torn.encode()))
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON ({error}): fix or remove that line") from None
    return records


def proven_optima(records: list[dict]) -> dict:
    """(instance, target) -> per-row proven optimum (None where no exact solver proved the row)."""
    optima: dict = {}
    for record in records:
        key = (record["instance"], record["target"])
        rows = optima.setdefault(key, [None] * record["rows"])
        statuses = record["row_status"] or (["optimal"] * record["rows"] if record["solver"] == "bruteforce" else None)
        if not statuses:
            continue
        for index, (status, value) in enumerate(zip(statuses, record["row_objective"])):
            if status == "optimal":
                rows[index] = value if rows[index] is None else min(rows[index], value)
    return optima


def row_gaps(records: list[dict], optima: dict) -> list[dict]:
    """One entry per (record, row with a proven optimum): relative gap and time."""
    entries = []
    for record in records:
        for index, value in enumerate(record["row_objective"]):
            optimum = optima[(record["instance"], record["target"])][index]
            if optimum is None:
                continue
            gap = (value - optimum) / optimum if optimum > 0 else 0.0
            proven = bool(record["row_status"] and record["row_status"][index] == "optimal")
            bound = record["row_bound"][index] if record["row_bound"] else None
            entries.append({**{k: record[k] for k in ("instance", "kind", "d", "target", "solver")},
                            "gap": max(gap, 0.0), "proven": proven or record["solver"] == "bruteforce",
                            "seconds": record["seconds_per_row"],
                            "bound_ratio": None if bound is None or optimum <= 0 else bound / optimum})
    return entries


def gap_table(records: list[dict]) -> str:
    optima = proven_optima(records)
    entries = row_gaps(records, optima)
    groups = defaultdict(list)
    for entry in entries:
        groups[(entry["kind"], entry["target"], entry["solver"])].append(entry)
    lines = []
    for kind, target in sorted({(k, t) for k, t, _ in groups}):
        known = sum(v is not None for key, rows in optima.items() for v in rows
                    if key[1] == target and _kind_of(records, key[0]) == kind)
        total = sum(len(rows) for key, rows in optima.items() if key[1] == target and _kind_of(records, key[0]) == kind)
        lines += [f"### {kind} instances, {target} ({known} of {total} rows with a proven optimum)", "",
                  "| solver | rows | mean gap | median gap | max gap | at optimum | proven here | bound / opt | s / row |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (k, t, solver), group in sorted(groups.items(), key=lambda item: _mean([e["gap"] for e in item[1]])):
            if (k, t) != (kind, target):
                continue
            gaps = [e["gap"] for e in group]
            ratios = [e["bound_ratio"] for e in group if e["bound_ratio"] is not None]
            lines.append(f"| {solver} | {len(group)} | {_mean(gaps):.2%} | {statistics.median(gaps):.2%} | "
                         f"{max(gaps):.2%} | {sum(g <= OPTIMAL_TOLERANCE for g in gaps) / len(gaps):.0%} | "
                         f"{sum(e['proven'] for e in group) / len(group):.0%} | "
                         f"{f'{_mean(ratios):.3f}' if ratios else '-'} | {_mean([e['seconds'] for e in group]):.3g} |")
        lines.append("")
    return "\n".join(lines)


def largest_closed(records: list[dict], limit: float) -> dict:
    """Per exact solver spec: the largest d at which every row it ran was proven within `limit` seconds."""
    by_solver = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["row_status"]:
            by_solver[record["solver"]][record["d"]].append(
                all(s == "optimal" for s in record["row_status"]) and record["seconds_per_row"] <= limit)
    return {solver: max((d for d, ok in by_d.items() if all(ok)), default=None) for solver, by_d in by_solver.items()}


def _kind_of(records, instance):
    return next(r["kind"] for r in records if r["instance"] == instance)


def _mean(values):
    return sum(values) / len(values) if values else math.nan


def plot_gaps(records: list[dict], folder: Path) -> list[Path]:
    from .output import plots_available

    if not plots_available():
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = row_gaps(records, proven_optima(records))
    written = []
    for target in sorted({e["target"] for e in entries}):
        figure, axis = plt.subplots(figsize=(6.5, 4))
        for solver in sorted({e["solver"] for e in entries}):
            by_d = defaultdict(list)
            for e in entries:
                if e["solver"] == solver and e["target"] == target:
                    by_d[e["d"]].append(e["gap"])
            if by_d:
                ds = sorted(by_d)
                axis.plot(ds, [100 * _mean(by_d[d]) for d in ds], marker="o", label=solver)
        axis.set_yscale("symlog", linthresh=0.1)
        axis.set_xlabel("row width d")
        axis.set_ylabel("mean gap to proven optimum (%)")
        axis.set_title(f"Optimality gap vs width, {target}")
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = folder / f"gap_vs_d_{target.replace(':', '-').replace('%', 'pct')}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for solver in sorted({r["solver"] for r in records if r["row_status"]}):
        by_d = defaultdict(list)
        for r in records:
            if r["solver"] == solver:
                by_d[r["d"]].append(r["seconds_per_row"])
        ds = sorted(by_d)
        axis.plot(ds, [statistics.median(by_d[d]) for d in ds], marker="o", label=solver)
    axis.set_yscale("log")
    axis.set_xlabel("row width d")
    axis.set_ylabel("median seconds per row")
    axis.set_title("Exact solvers: time per row vs width")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = folder / "exact_time_vs_d.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return written + [path]


def write_report(jsonl: Path, folder: Path) -> str:
    """gaps.md and the plots in `folder`, from the JSONL alone."""
    records = read_jsonl(jsonl)
    if not records:
        raise UserError(f"{jsonl} holds no results: run `sparseswaps gaps` first")
    time_limit = max((r["time_limit"] for r in records if r["time_limit"]), default=None)
    closed = largest_closed(records, time_limit or math.inf)
    commands = sorted({r.get("command", "") for r in records} - {""})
    text = "\n".join([
        "# Optimality gaps against proven optima", "",
        f"Generated by `sparseswaps report` from `{jsonl.name}` ({len(records)} runs). Gap = objective / proven "
        "optimum - 1 per row, over rows some exact solver proved; 'at optimum' = gap <= 1e-9; "
        "'proven here' = this solver proved the row itself.", "",
        *[f"Command: `{c}`" for c in commands], "",
        gap_table(records),
        f"Largest d at which every row was proven optimal within {time_limit} s: " +
        ", ".join(f"{solver}: {d}" for solver, d in sorted(closed.items())), ""])
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "gaps.md", text)
    plot_gaps(records, folder)
    return text


def save_optima(records: list[dict], folder: Path) -> None:
    """Known optima beside the instances, for later runs and other tools."""
    optima = {f"{instance}|{target}": rows for (instance, target), rows in proven_optima(records).items()}
    write_json_atomic(folder / "optima.json", optima)
