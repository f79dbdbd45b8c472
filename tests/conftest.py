import pytest
import torch

from sparseswaps import MaskProblem

# Every pattern the design asks tests to cover: inverted counts hide at 50% and 2:4.
PATTERNS = [{"sparsity": 0.5}, {"sparsity": 0.6}, {"sparsity": 0.7},
            {"pattern": "2:4"}, {"pattern": "1:4"}, {"pattern": "3:4"}]
PATTERN_IDS = ["50%", "60%", "70%", "2:4", "1:4", "3:4"]


def make_inputs(family: str, tokens: int, d: int, seed: int) -> torch.Tensor:
    """Calibration inputs X [tokens, d]: i.i.d., correlated (low-rank plus noise) or with outlier channels."""
    generator = torch.Generator().manual_seed(seed)
    if family == "iid":
        return torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    if family == "correlated":
        latent = torch.randn(tokens, max(2, d // 4), generator=generator, dtype=torch.float64)
        mixing = torch.randn(latent.shape[1], d, generator=generator, dtype=torch.float64)
        return latent @ mixing + 0.3 * torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    if family == "outliers":
        x = torch.randn(tokens, d, generator=generator, dtype=torch.float64)
        x[:, torch.randperm(d, generator=generator)[: max(1, d // 8)]] *= 25
        return x
    raise ValueError(family)


def make_problem(family="correlated", rows=3, d=12, seed=0, tokens=64, **pattern) -> tuple[MaskProblem, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1000)
    x = make_inputs(family, tokens, d, seed)
    weight = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    return MaskProblem.from_inputs(weight, x, **pattern), x


@pytest.fixture(params=PATTERNS, ids=PATTERN_IDS)
def pattern(request):
    return request.param


def assert_same_pair_or_a_tie(w, mask, c, gram, got, expected, ulps: float = 16):
    """Two scans agree: in every row the same (i, j), or pairs whose float64 Δ are equal up to float32
    rounding (`ulps` units of the pairs' term magnitudes |w_i² G_ii| + |2 w_i c_i| + ... + |2 w_i w_j G_ij|):
    a near-tie that two float32 summation orders may break either way. got / expected: (best, i, j)."""
    from sparseswaps.solvers.swap_formula import exact_deltas

    w64, c64, gram64 = w.double(), c.double(), gram.double()
    _, got_i, got_j = got
    _, ref_i, ref_j = expected
    assert (~mask.gather(1, got_i[:, None])).all() and mask.gather(1, got_j[:, None]).all()
    differs = (got_i != ref_i) | (got_j != ref_j)
    size = _term_size(w64, c64, gram64, got_i, got_j) + _term_size(w64, c64, gram64, ref_i, ref_j)
    gap = (exact_deltas(w64, c64, gram64, got_i, got_j) - exact_deltas(w64, c64, gram64, ref_i, ref_j)).abs()
    tolerance = ulps * torch.finfo(torch.float32).eps * size
    assert (gap[differs] <= tolerance[differs]).all(), (
        f"rows {differs.nonzero().flatten().tolist()} chose pairs whose float64 Δ differ by "
        f"{gap[differs].tolist()} (tolerance {tolerance[differs].tolist()})")


def _term_size(w, c, gram, i, j):
    """|w_i² G_ii| + |2 w_i c_i| + |w_j² G_jj| + |2 w_j c_j| + |2 w_i w_j G_ij| of each row's pair (i, j)."""
    rows = torch.arange(len(i), device=w.device)
    wi, wj, ci, cj = w[rows, i], w[rows, j], c[rows, i], c[rows, j]
    return (wi * wi * gram[i, i]).abs() + (2 * wi * ci).abs() + (wj * wj * gram[j, j]).abs() + (
        2 * wj * cj).abs() + (2 * wi * wj * gram[i, j]).abs()


def assert_refit_scan_matches_torch(scan: str, spec: dict, group, d: int, device: str = "cpu") -> None:
    """refit_swaps' `scan` ("triton" or "numba") gives the torch scan's best Δ and slots exactly, along a
    refinement path, ties included: every input appears twice."""
    import sparseswaps as ss
    from sparseswaps.solvers.refit_swaps import _Batch

    problem, _ = make_problem("outliers", rows=16, d=d, seed=3, tokens=384, **spec)
    gram = problem.gram.double().to(device)
    twice = torch.cat([gram, gram], 1)
    gram = torch.cat([twice, twice], 0) + torch.eye(2 * d, dtype=torch.float64, device=device)
    weight = problem.weight.double().to(device).repeat(1, 2)
    keep = ss.solve(ss.MaskProblem(weight.float(), gram.float(), pattern=problem.pattern), "magnitude").mask
    scale = float(gram.diagonal().max())
    fast, plain = (_Batch(weight, gram, 0.0, keep, group, scan=name) for name in (scan, "torch"))
    for _ in range(6):
        got, want = fast.best_swaps(scale), plain.best_swaps(scale)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for batch in (fast, plain):
            batch.swap(*want[1:], want[0])


def with_dead_input(problem: MaskProblem, index: int) -> tuple[MaskProblem, torch.Tensor]:
    """The problem with input `index` dead (a zero row and column of G, as behind Gemma-3's zero norm channels),
    and magnitude's mask keeping it in every row instead of a kept neighbour (of its group of four first)."""
    import sparseswaps as ss

    gram = problem.gram.clone()
    gram[index], gram[:, index] = 0, 0
    dead = MaskProblem(problem.weight, gram, pattern=problem.pattern)
    start = ss.solve(dead, "magnitude").mask
    group = range(index - index % 4, index - index % 4 + 4)
    for row in start:
        if not row[index]:
            row[next(i for i in (*group, *range(len(row))) if row[i] and i != index)], row[index] = False, True
    return dead, start
