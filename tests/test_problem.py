import itertools

import pytest
import torch

import sparseswaps as ss
from sparseswaps import NM, MaskProblem, PerRow, ProblemError, mask_from_scores
from conftest import make_problem


def all_feasible_masks(problem):
    """Independent enumeration (not the bruteforce solver's code): every feasible mask of one row."""
    d = problem.d
    if isinstance(problem.pattern, PerRow):
        for kept in itertools.combinations(range(d), problem.pattern.keep):
            m = torch.zeros(d, dtype=torch.bool)
            m[list(kept)] = True
            yield m
    else:
        n, m_ = problem.pattern.n, problem.pattern.m
        per_group = [list(itertools.combinations(range(m_), n))] * (d // m_)
        for choice in itertools.product(*per_group):
            m = torch.zeros(d, dtype=torch.bool)
            for g, kept in enumerate(choice):
                m[[g * m_ + k for k in kept]] = True
            yield m


@pytest.mark.parametrize("family", ["iid", "correlated", "outliers"])
def test_objective_equals_reconstruction_error_from_inputs(family, pattern):
    problem, x = make_problem(family, rows=4, d=12, **pattern)
    mask = mask_from_scores(torch.rand(4, 12, dtype=torch.float64), problem.pattern)
    direct = ((x @ (problem.weight * ~mask).T) ** 2).sum(0)   # ||X (w ⊙ ¬m)||² per row
    torch.testing.assert_close(problem.objective(mask), direct, rtol=1e-10, atol=0)


@pytest.mark.parametrize("family", ["iid", "correlated", "outliers"])
def test_bruteforce_finds_the_enumerated_optimum(family, pattern):
    problem, x = make_problem(family, rows=2, d=12, seed=3, **pattern)
    result = ss.solve(problem, "bruteforce")
    for row in range(problem.rows):
        row_problem = problem.subset([row])
        best = min(row_problem.total_objective(m.unsqueeze(0)) for m in all_feasible_masks(problem))
        assert result.row_objective[row].item() == pytest.approx(best, rel=1e-12)


def test_wanda_rounding_and_keep_counts():
    problem, _ = make_problem(d=12, sparsity=0.7)
    assert problem.pattern == PerRow(12 - int(12 * 0.7))
    assert problem.keep == 4
    assert make_problem(d=12, pattern="3:4")[0].keep == 9
    assert make_problem(d=12, pattern="1:4")[0].pattern == NM(1, 4)


def test_feasibility_and_projection(pattern):
    problem, _ = make_problem(rows=5, d=12, **pattern)
    feasible = mask_from_scores(problem.wanda_scores(), problem.pattern)
    assert problem.is_feasible(feasible)
    broken = feasible.clone()
    broken[:, 0] = ~broken[:, 0]
    assert not problem.is_feasible(broken)
    repaired = problem.project(broken)
    assert problem.is_feasible(repaired)
    # One flip per row broke it; the nearest feasible mask is at most one more flip away.
    assert ((repaired != broken).sum(1) <= 1).all()
    assert torch.equal(problem.project(feasible), feasible)


def test_mask_from_scores_breaks_ties_like_wanda():
    scores = torch.ones(1, 8)
    mask = mask_from_scores(scores, PerRow(4))
    assert mask.tolist() == [[False] * 4 + [True] * 4]   # stable ascending sort prunes lower indices first


def with_corner(gram, value):
    spoiled = gram.clone()
    spoiled[0, 0] = value
    return spoiled


BAD_INPUTS = [
    ("shape mismatch", lambda w, g: MaskProblem(w, g[:5, :5], sparsity=0.5), "must be 12 x 12"),
    ("nan weight", lambda w, g: MaskProblem(w.masked_fill(w > 1, float("nan")), g, sparsity=0.5), "NaN"),
    ("inf gram", lambda w, g: MaskProblem(w, with_corner(g, float("inf")), sparsity=0.5), "NaN or infinite"),
    ("asymmetric", lambda w, g: MaskProblem(w, g + torch.triu(torch.ones_like(g)) * g.abs().max(), sparsity=0.5), "not symmetric"),
    ("not psd", lambda w, g: MaskProblem(w, g - 2 * g.abs().max() * torch.eye(12, dtype=g.dtype), sparsity=0.5), "negative diagonal"),
    ("indefinite", lambda w, g: MaskProblem(w[:, :2], torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=g.dtype),
                                            pattern=PerRow(1)), "not positive semidefinite"),
    ("sparsity zero", lambda w, g: MaskProblem(w, g, sparsity=0.0), "strictly between 0 and 1"),
    ("sparsity one", lambda w, g: MaskProblem(w, g, sparsity=1.0), "strictly between 0 and 1"),
    ("sparsity too small", lambda w, g: MaskProblem(w, g, sparsity=0.01), "prunes 0"),
    ("nm not dividing", lambda w, g: MaskProblem(w, g, pattern="2:5"), "not divisible by M=5"),
    ("n >= m", lambda w, g: MaskProblem(w, g, pattern="4:4"), "0 < N < M"),
    ("garbage pattern", lambda w, g: MaskProblem(w, g, pattern="half"), "not of the form"),
    ("both given", lambda w, g: MaskProblem(w, g, sparsity=0.5, pattern="2:4"), "exactly one"),
    ("neither given", lambda w, g: MaskProblem(w, g), "exactly one"),
    ("integer weight", lambda w, g: MaskProblem(w.long(), g, sparsity=0.5), "floating point"),
    ("1-d weight", lambda w, g: MaskProblem(w[0], g, sparsity=0.5), "2-D"),
    ("zero gram", lambda w, g: MaskProblem(w, torch.zeros_like(g), sparsity=0.5), "all zeros"),
    ("inputs width", lambda w, g: MaskProblem.from_inputs(w, torch.randn(10, 7), sparsity=0.5), "expected [..., 12]"),
]


@pytest.mark.parametrize("build, message", [(b, m) for _, b, m in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS])
def test_bad_problem_input_raises_clear_error(build, message):
    problem, _ = make_problem(d=12, sparsity=0.5)
    with pytest.raises(ProblemError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build(problem.weight, problem.gram)


BAD_WARM_STARTS = [
    ("wrong shape", lambda m: m[:, :6], "has shape"),
    ("wrong dtype", lambda m: m.float(), "dtype torch.float32"),
    ("not a tensor", lambda m: m.tolist(), "must be a torch.Tensor"),
    ("infeasible", lambda m: torch.ones_like(m), "infeasible"),
]


@pytest.mark.parametrize("spoil, message", [(s, m) for _, s, m in BAD_WARM_STARTS], ids=[n for n, _, _ in BAD_WARM_STARTS])
def test_bad_warm_start_raises_clear_error(spoil, message):
    problem, _ = make_problem(d=12, sparsity=0.5)
    good = mask_from_scores(problem.wanda_scores(), problem.pattern)
    with pytest.raises(ProblemError, match=message):
        ss.solve(problem, "swaps", warm_start=spoil(good))
