"""One suite over every registered solver: feasible masks, objective >= optimum, bound <= optimum, exact
solvers reach it, warm starts respected, determinism. Brute force is the oracle."""
import pytest
import torch

import sparseswaps as ss
from conftest import PATTERN_IDS, PATTERNS, make_problem

# How each registered solver is exercised; a registered solver missing here fails test_every_solver_is_covered.
SOLVER_CASES = {
    "magnitude": {},
    "wanda": {},
    "ria": {},
    "sparsegpt": {},
    "admm": {},
    "alps": {},
    "refit": {"warm_start": "wanda"},
    "refit_swaps": {},
    "dsnot": {},
    "swaps": {},
    "bruteforce": {},
    "bruteforce_refit": {},
    "scip": {"time_limit": 60},
    "highs": {"time_limit": 60},
    "scip_refit": {"row_time_limit": 60},
}
EXACT = {"bruteforce", "scip", "highs"}
REL = 1e-9


def test_every_solver_is_covered():
    assert set(SOLVER_CASES) == set(ss.solver_classes())


def runnable(name):
    ok, why = ss.solver_classes()[name]().available()
    if not ok:
        pytest.skip(why)
    return name


@pytest.fixture(scope="module")
def instances():
    """Brute-forceable instances (d = 12) of three input families for every pattern, with their optima."""
    cache = {}
    for spec, label in zip(PATTERNS, PATTERN_IDS):
        for family in ("iid", "correlated", "outliers"):
            problem, _ = make_problem(family, rows=3, d=12, seed=7, **spec)
            cache[label, family] = (problem, ss.solve(problem, "bruteforce"))
    return cache


@pytest.mark.parametrize("label", PATTERN_IDS)
@pytest.mark.parametrize("name", sorted(SOLVER_CASES))
def test_feasible_bounded_and_exact(name, label, instances):
    runnable(name)
    for family in ("iid", "correlated", "outliers"):
        problem, optimum = instances[label, family]
        result = ss.solve(problem, name, **SOLVER_CASES[name])
        assert problem.is_feasible(result.mask)
        assert result.mask.dtype == torch.bool and result.mask.shape == problem.weight.shape
        torch.testing.assert_close(result.row_objective, problem.objective(result.mask), rtol=0, atol=0)
        assert (result.row_objective >= optimum.row_objective * (1 - REL)).all()
        assert (result.weight is not None) == ss.solver_classes()[name].weights, "the weights flag says otherwise"
        if result.weight is not None:
            assert (result.weight[~result.mask] == 0).all()
            assert torch.equal(result.row_weight_objective, problem.reconstruction_error(result.weight))
        if result.row_bound is not None:
            assert (result.row_bound <= optimum.row_objective * (1 + REL)).all(), f"{name}: bound above optimum"
        if name in EXACT:
            torch.testing.assert_close(result.row_objective, optimum.row_objective, rtol=REL, atol=0)
            assert result.termination == ss.Termination.OPTIMAL


@pytest.mark.parametrize("name", sorted(SOLVER_CASES))
def test_deterministic(name, instances):
    runnable(name)
    problem, _ = instances["60%", "correlated"]
    first = ss.solve(problem, name, seed=3, **SOLVER_CASES[name])
    second = ss.solve(problem, name, seed=3, **SOLVER_CASES[name])
    assert torch.equal(first.mask, second.mask)


@pytest.mark.parametrize("label", PATTERN_IDS)
@pytest.mark.parametrize("name", sorted(n for n, c in ss.solver_classes().items() if c.warm_start))
def test_warm_start_respected(name, label, instances):
    runnable(name)
    problem, optimum = instances[label, "outliers"]
    if name == "dsnot":
        # DSnoT does not minimise this objective; with no cycles it must return its warm start untouched.
        start = ss.solve(problem, "magnitude").mask
        assert torch.equal(ss.solve(problem, name, warm_start=start, max_cycles=0).mask, start)
        return
    # A method that improves a mask must never return one worse than the mask it was given.
    options = {key: value for key, value in SOLVER_CASES[name].items() if key != "warm_start"}
    for start in (ss.solve(problem, "magnitude").mask, optimum.mask):
        result = ss.solve(problem, name, warm_start=start, **options)
        if result.weight is None:
            assert (result.row_objective <= problem.objective(start) * (1 + REL)).all()
        else:       # a weight solver is held to the least-squares error of the mask it was given
            refitted = ss.solve(problem, "refit", warm_start=start, damping=0.0)
            assert (result.row_weight_objective <= refitted.row_weight_objective * (1 + 1e-5)).all()   # damping


def test_dsnot_leaves_mlp_layers_at_the_warm_start_like_the_reference():
    weight, x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), torch.randn(4, 32, 16)
    x += 2.0   # a non-zero input mean, so DSnoT has an error to cancel
    start = ss.solve(ss.MaskProblem.from_inputs(weight, x, sparsity=0.5), "wanda").mask
    names = {"model.layers.0.mlp.down_proj": "mlp", "model.layers.0.self_attn.q_proj": "self_attn"}
    masks = {kind: ss.solve(ss.MaskProblem.from_inputs(weight, x, sparsity=0.5, name=name), "dsnot").mask
             for name, kind in names.items()}
    assert torch.equal(masks["mlp"], start)
    assert not torch.equal(masks["self_attn"], start)
    no_skip = ss.solve(ss.MaskProblem.from_inputs(weight, x, sparsity=0.5, name="model.layers.0.mlp.down_proj"),
                       "dsnot", skip_layer="no_skip").mask
    assert torch.equal(no_skip, masks["self_attn"])
