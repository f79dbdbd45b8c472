import importlib.metadata
import json

import pytest
import torch

import sparseswaps as ss
from sparseswaps import cli, registry
from sparseswaps.registry import SolverError
from conftest import make_problem


def test_unknown_solver_lists_the_registered_ones():
    problem, _ = make_problem(sparsity=0.5)
    with pytest.raises(ss.SolverError, match="unknown solver 'nope'.*wanda"):
        ss.solve(problem, "nope")


def test_unknown_option_names_the_accepted_ones():
    problem, _ = make_problem(sparsity=0.5)
    with pytest.raises(ss.SolverError, match="does not take option.*max_iters.*takes: alpha"):
        ss.solve(problem, "ria", max_iters=3)


def test_unavailable_solver_says_why(monkeypatch):
    problem, _ = make_problem(sparsity=0.5)
    monkeypatch.setattr(ss.solver_classes()["scip"], "available", lambda self: (False, "pyscipopt missing"))
    with pytest.raises(ss.SolverError, match="not available here: pyscipopt missing"):
        ss.solve(problem, "scip")
    assert "scip" not in ss.available_solvers()


def test_a_callable_is_a_solver_and_its_objective_is_recomputed():
    problem, _ = make_problem(sparsity=0.5)

    def keep_first_half(problem, **_):
        mask = torch.zeros_like(problem.weight, dtype=torch.bool)
        mask[:, : problem.keep] = True
        return mask

    result = ss.solve(problem, keep_first_half)
    assert result.solver == "keep_first_half"
    assert result.objective == pytest.approx(problem.total_objective(result.mask), rel=0)


def test_an_infeasible_solver_output_is_caught():
    problem, _ = make_problem(sparsity=0.5)
    with pytest.raises(ss.ProblemError, match="returned by solver"):
        ss.solve(problem, lambda problem, **_: torch.ones_like(problem.weight, dtype=torch.bool))


def test_chain_passes_each_result_on():
    problem, _ = make_problem("outliers", rows=4, d=32, seed=3, sparsity=0.6)
    result = ss.solve(problem, ["magnitude", "swaps"])
    stages = result.extra["chain"]
    assert [s["solver"] for s in stages] == ["magnitude", "swaps"]
    assert stages[0]["objective"] >= stages[1]["objective"]
    assert result.extra["warm_start_objective"] == stages[0]["objective"]


def test_entry_point_solvers_are_registered(monkeypatch):
    class ThirdParty(ss.Solver):
        def solve(self, problem, *, warm_start=None, time_limit=None, seed=0):
            return ss.mask_from_scores(-problem.weight.abs(), problem.pattern)

    class FakeEntryPoint:
        name = "third_party"

        def load(self):
            return ThirdParty

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else real(group=group))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "third_party" in ss.available_solvers()
    problem, _ = make_problem(sparsity=0.5)
    assert ss.solve(problem, "third_party").solver == "third_party"


def test_result_round_trips_through_safetensors_and_json(tmp_path):
    problem, _ = make_problem(sparsity=0.5)
    result = ss.solve(problem, "bruteforce")
    result.save(tmp_path / "r")
    loaded = ss.SolveResult.load(tmp_path / "r")
    assert torch.equal(loaded.mask, result.mask)
    assert loaded.objective == result.objective and loaded.bound == result.bound
    assert json.loads((tmp_path / "r.json").read_text())["termination"] == "optimal"
    assert loaded.gap == pytest.approx(result.gap)


def test_gap_is_zero_when_proven_and_inf_without_bound():
    problem, _ = make_problem(sparsity=0.5)
    assert ss.solve(problem, "bruteforce").gap == pytest.approx(0, abs=1e-12)
    assert ss.solve(problem, "wanda").gap == float("inf")


def test_a_warm_start_for_a_solver_that_ignores_it_is_refused():
    problem, _ = make_problem("correlated", rows=4, d=16, seed=0, sparsity=0.5)
    with pytest.raises(SolverError, match="'sparsegpt' ignores a warm start"):
        ss.solve(problem, ["wanda", "sparsegpt"])
    with pytest.raises(SolverError, match="ignores a warm start"):
        ss.solve(problem, "admm", warm_start=ss.solve(problem, "wanda").mask)


def test_the_prune_command_warm_starts_only_solvers_that_use_it(capsys):
    from sparseswaps.pipeline import PruneConfig

    assert PruneConfig(solver="sparsegpt").resolved().warm_start is None
    assert PruneConfig(solver="swaps").resolved().warm_start == "wanda"
    assert cli.main(["prune", "--solver", "sparsegpt", "--warm-start", "wanda"]) == 2
    assert "--solver sparsegpt ignores a warm start" in capsys.readouterr().err


def test_a_backend_that_fails_to_import_is_listed_and_breaks_nothing(monkeypatch):
    from sparseswaps import registry

    monkeypatch.setitem(registry.BUILTIN_SOLVERS, "broken", "sparseswaps_no_such_module")
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_loaded", False)
    status = {row["name"]: row for row in registry.solver_status()}
    assert not status["broken"]["available"] and "sparseswaps_no_such_module" in status["broken"]["reason"]
    assert status["wanda"]["available"]
    with pytest.raises(SolverError, match="'broken' is not available here: importing"):
        ss.get_solver("broken")
    problem, _ = make_problem("correlated", rows=4, d=16, seed=0, sparsity=0.5)
    assert problem.is_feasible(ss.solve(problem, "wanda").mask)


def test_why_a_solver_stopped_is_apart_from_what_it_returned():
    problem, _ = make_problem("correlated", rows=3, d=12, seed=0, sparsity=0.5)
    exact, heuristic = ss.solve(problem, "bruteforce"), ss.solve(problem, "wanda")
    assert (exact.termination, exact.status) == (ss.Termination.OPTIMAL, ss.SolutionStatus.OPTIMAL)
    assert (heuristic.termination, heuristic.status) == (ss.Termination.HEURISTIC, ss.SolutionStatus.FEASIBLE)
    assert json.loads(json.dumps(exact.summary()))["status"] == "optimal"


def test_a_chain_out_of_time_stops_after_the_stage_in_progress():
    import time

    problem, _ = make_problem("correlated", rows=3, d=12, seed=0, sparsity=0.5)

    def slow(problem, **_):
        time.sleep(0.3)
        return ss.mask_from_scores(problem.wanda_scores(), problem.pattern)

    result = ss.solve(problem, [slow, "swaps", "bruteforce"], time_limit=0.1)
    assert result.solver == "slow" and result.termination == ss.Termination.TIME_LIMIT
    assert "later stages did not run" in result.message


@pytest.mark.parametrize("scip_status, gap, expected", [("optimal", 0, "optimal"), ("gaplimit", 0, "optimal"),
                                                        ("gaplimit", 0.01, "gap_limit"), ("timelimit", 0, "time_limit"),
                                                        ("memlimit", 0, "memory_limit"), ("nodelimit", 0, "iteration_limit"),
                                                        ("infeasible", 0, "infeasible"), ("userinterrupt", 0, "error")])
def test_scip_statuses_are_reported_as_what_they_are(scip_status, gap, expected):
    from sparseswaps.solvers.scip import row_status

    status, message = row_status(scip_status, gap)
    assert status == expected and (("userinterrupt" in message) == (expected == "error"))


@pytest.mark.parametrize("name, expected", [("kOptimal", "optimal"), ("kTimeLimit", "time_limit"),
                                            ("kMemoryLimit", "memory_limit"), ("kInfeasible", "infeasible"),
                                            ("kIterationLimit", "iteration_limit"), ("kInterrupt", "error")])
def test_highs_statuses_are_reported_as_what_they_are(name, expected):
    from types import SimpleNamespace

    from sparseswaps.solvers.highs import row_status

    status, message = row_status(SimpleNamespace(name=name))
    assert status == expected and (("kInterrupt" in message) == (expected == "error"))


@pytest.mark.parametrize("name", ["scip", "highs"])
def test_exact_solvers_spend_the_budget_of_the_whole_call(name):
    problem, _ = make_problem("correlated", rows=3, d=12, seed=0, sparsity=0.5)
    if not ss.get_solver(name).available()[0]:
        pytest.skip(f"{name} is not installed")
    start = ss.solve(problem, "wanda").mask
    result = ss.solve(problem, name, warm_start=start, time_limit=1e-9)
    assert result.termination == ss.Termination.TIME_LIMIT and result.status == ss.SolutionStatus.FEASIBLE
    assert "3 of 3 rows time limit" in result.message and torch.equal(result.mask, start)
    assert ss.solve(problem, name, row_time_limit=60).termination == ss.Termination.OPTIMAL


def test_a_solver_as_warm_start_of_a_chain_runs_first():
    problem, _ = make_problem("correlated", rows=3, d=12, seed=0, sparsity=0.5)
    given = ss.solve(problem, ["swaps", "refit"], warm_start="wanda")
    assert [stage["solver"] for stage in given.extra["chain"]] == ["wanda", "swaps", "refit"]
    assert torch.equal(given.weight, ss.solve(problem, ["wanda", "swaps", "refit"]).weight)


def test_a_weight_solvers_result_round_trips_with_its_weights_and_bound(tmp_path):
    pytest.importorskip("pyscipopt")
    problem, _ = make_problem(rows=2, d=12, sparsity=0.5)
    result = ss.solve(problem, "scip_refit")
    result.save(tmp_path / "r")
    loaded = ss.SolveResult.load(tmp_path / "r")
    assert torch.equal(loaded.weight, result.weight.cpu())
    assert torch.equal(loaded.row_weight_objective, result.row_weight_objective)
    assert torch.equal(loaded.row_weight_bound, result.row_weight_bound) and loaded.weight_gap == result.weight_gap
    assert loaded.message == result.message
