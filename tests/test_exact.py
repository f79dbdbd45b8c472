"""Exact backends and their bounds against brute force; time limits never raise."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparseswaps as ss
from conftest import PATTERN_IDS, PATTERNS, make_problem

VARIANTS = [("scip", {}), ("scip", {"diagonal_shift": True}), ("highs", {}),
            ("highs", {"method": "qp_bound"}), ("highs", {"method": "qp_bound", "diagonal_shift": False})]


@pytest.mark.parametrize("spec", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}{o}" for n, o in VARIANTS])
def test_bounds_are_valid_and_exact_routes_reach_the_optimum(name, options, spec):
    for family, seed in (("correlated", 5), ("outliers", 6)):
        problem, _ = make_problem(family, rows=3, d=12, seed=seed, **spec)
        optimum = ss.solve(problem, "bruteforce").row_objective
        result = ss.solve(problem, name, time_limit=60, **options)
        assert (result.row_bound <= optimum * (1 + 1e-9)).all()
        assert (result.row_bound >= 0).all()
        if options.get("method") != "qp_bound":
            torch.testing.assert_close(result.row_objective, optimum, rtol=1e-9, atol=0)


def test_diagonal_shift_tightens_the_relaxation_bound():
    problem, _ = make_problem("correlated", rows=6, d=24, seed=2, sparsity=0.5)
    plain = ss.solve(problem, "highs", method="qp_bound", diagonal_shift=False)
    shifted = ss.solve(problem, "highs", method="qp_bound", diagonal_shift=True)
    assert (shifted.row_bound >= plain.row_bound * (1 - 1e-9)).all() and shifted.bound > plain.bound


@pytest.mark.parametrize("name, options", [("scip", {}), ("highs", {})])
def test_time_limit_returns_best_mask_status_and_valid_bound(name, options):
    problem, _ = make_problem("outliers", rows=2, d=56, seed=4, sparsity=0.5)
    warm = ss.solve(problem, ["wanda", "swaps"])
    result = ss.solve(problem, name, warm_start=warm.mask, time_limit=0.05, **options)
    assert problem.is_feasible(result.mask)
    assert result.termination in (ss.Termination.TIME_LIMIT, ss.Termination.OPTIMAL)
    assert (result.row_objective <= warm.row_objective * (1 + 1e-12)).all()
    assert (result.row_bound <= result.row_objective * (1 + 1e-12)).all()


def test_rows_in_a_process_pool_match_serial():
    problem, _ = make_problem("correlated", rows=4, d=16, seed=9, sparsity=0.6)
    serial = ss.solve(problem, "scip")
    pooled = ss.solve(problem, "scip", workers=2)
    assert torch.equal(serial.mask, pooled.mask)
    torch.testing.assert_close(serial.row_bound, pooled.row_bound)


@pytest.mark.parametrize("name", ["scip", "highs"])
def test_rows_on_a_local_ray_match_the_process_pool(name):
    pytest.importorskip("ray")
    problem, _ = make_problem("correlated", rows=4, d=16, seed=9, sparsity=0.6)
    pooled = ss.solve(problem, name, workers=2)
    on_ray = ss.solve(problem, name, executor="ray")
    assert torch.equal(pooled.mask, on_ray.mask) and torch.equal(pooled.row_bound, on_ray.row_bound)
    assert on_ray.extra["row_status"] == pooled.extra["row_status"]


def test_an_unknown_executor_is_refused():
    problem, _ = make_problem("correlated", rows=2, d=12, seed=1, sparsity=0.5)
    with pytest.raises(ss.SolverError, match="executor must be one of process, ray"):
        ss.solve(problem, "scip", executor="dask")



POOL_AFTER_THREADED_BLAS = """
import json
import torch
from sparseswaps.solvers.exact import map_rows

def first_coefficient(seed):
    # least squares of a random matrix against its own first column: the answer is e_1
    a = torch.randn(256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.lstsq(a, a[:, :1]).solution[0, 0].item()

if __name__ == "__main__":
    torch.set_num_threads(2)
    a = torch.randn(1024, 1024, dtype=torch.float64)
    (a @ a).sum()      # the parent's BLAS starts its OpenMP threads before the pool forks
    print(json.dumps(map_rows(first_coefficient, [0, 1, 2, 3], workers=2)))
"""


def test_row_pools_finish_after_the_parent_ran_threaded_blas(tmp_path):
    """Forked row workers hung in MKL's OpenMP dgemm (inside a least-squares solve) once the parent had run a
    threaded BLAS call, as `scip_refit` did on 96-input rows; the subprocess's timeout turns a hang into a failure."""
    script = tmp_path / "pool.py"
    script.write_text(POOL_AFTER_THREADED_BLAS)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=environment)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == pytest.approx([1.0] * 4, abs=1e-9)
