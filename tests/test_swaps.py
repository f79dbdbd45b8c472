import pytest
import torch

import sparseswaps as ss
from sparseswaps import NM, PerRow
from conftest import assert_same_pair_or_a_tie, make_problem


def shortlist_from_low(approximate_low):
    """A torch shortlist from `approximate_low(w, scale, restore, gram)` ≈ low[r, j] = min_i (a_ri - 2 w_ri w_rj
    G_ij): the k kept j with the smallest low + b, re-scored exactly (a CPU stand-in for the GPU filter in these tests)."""
    from sparseswaps.solvers.swaps import masked_swap_terms, rescore_candidates

    def shortlist(w, mask, c, gram, k):
        restore, prune = masked_swap_terms(w, mask, c, gram)
        scale = -2 * w
        estimate = approximate_low(w, scale, restore, gram).to(w.dtype) + prune
        top = estimate.topk(k, 1, largest=False).indices.sort(1).values
        return rescore_candidates(w, scale, restore, prune, gram, top)
    return shortlist


def best_swap_by_enumeration(problem, mask) -> torch.Tensor:
    """Per row, the best objective change over every feasible 1-swap, recomputed from scratch in float64."""
    base = problem.objective(mask)
    best = torch.zeros(problem.rows, dtype=torch.float64)
    for row in range(problem.rows):
        for i in (~mask[row]).nonzero().flatten().tolist():
            for j in mask[row].nonzero().flatten().tolist():
                if isinstance(problem.pattern, NM) and i // problem.pattern.m != j // problem.pattern.m:
                    continue
                swapped = mask.clone()
                swapped[row, i], swapped[row, j] = True, False
                best[row] = min(best[row], problem.objective(swapped)[row] - base[row])
    return best


@pytest.mark.parametrize("family", ["iid", "correlated", "outliers"])
def test_swaps_leaves_no_improving_swap(family, pattern):
    problem, _ = make_problem(family, rows=4, d=16, seed=11, **pattern)
    result = ss.solve(problem, "swaps", dtype="float64")
    assert result.termination == ss.Termination.LOCAL_OPTIMUM
    improvement = best_swap_by_enumeration(problem, result.mask)
    assert (improvement >= -1e-9 * result.row_objective).all()


def test_float32_scan_reaches_a_local_optimum_too(pattern):
    problem, _ = make_problem("outliers", rows=6, d=32, seed=5, **pattern)
    result = ss.solve(problem, "swaps")
    improvement = best_swap_by_enumeration(problem, result.mask)
    # float32 scan, float64 check: only swaps within float32 rounding of the row error can be missed
    assert (improvement >= -1e-5 * result.row_objective).all()


def test_swaps_never_increase_the_objective_and_count_swaps():
    problem, _ = make_problem("correlated", rows=8, d=64, seed=2, sparsity=0.6)
    wanda = ss.solve(problem, "wanda")
    result = ss.solve(problem, "swaps", warm_start=wanda.mask)
    assert (result.row_objective <= wanda.row_objective).all()
    changed = (result.mask != wanda.mask).sum(1)
    assert (changed <= 2 * result.extra["swaps"]).all()
    assert result.extra["swaps_total"] == int(result.extra["swaps"].sum())


def test_cuda_batches_follow_the_free_memory(monkeypatch):
    """Half the free GPU memory over the per-row working set: d * d pairs for the dense torch scan,
    64 bytes per entry for the fused one."""
    from sparseswaps.solvers.swaps import batch_rows_for

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    assert batch_rows_for(4096, PerRow(2048), 4, cuda, dense=False) == (4 << 30) // (4096 * 64)
    assert batch_rows_for(4096, PerRow(2048), 4, cuda, dense=True) == (4 << 30) // (4096 * 4096 * 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    assert batch_rows_for(28672, PerRow(14336), 4, cuda, dense=True) == 1


@pytest.mark.parametrize("batch_rows", [1, 3, 64])
def test_batching_does_not_change_the_result(batch_rows):
    problem, _ = make_problem("outliers", rows=7, d=24, seed=4, sparsity=0.5)
    reference = ss.solve(problem, "swaps", batch_rows=100)
    assert torch.equal(ss.solve(problem, "swaps", batch_rows=batch_rows).mask, reference.mask)


def test_iteration_limit_is_reported():
    problem, _ = make_problem("outliers", rows=4, d=64, seed=1, sparsity=0.5)
    result = ss.solve(problem, "swaps", warm_start="magnitude", max_iters=1)
    assert result.termination == ss.Termination.ITERATION_LIMIT
    assert result.extra["iterations"] == 1


def test_default_warm_start_is_wanda():
    problem, _ = make_problem("correlated", rows=4, d=32, seed=9, sparsity=0.5)
    assert torch.equal(ss.solve(problem, "swaps").mask, ss.solve(problem, ["wanda", "swaps"]).mask)


def test_bad_options_are_rejected():
    problem, _ = make_problem(sparsity=0.5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ss.solve(problem, "swaps", dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype 'float16' filters with the Gluon GPU kernel"):
        ss.solve(problem, "swaps", dtype="float16", device="cpu")
    with pytest.raises(ValueError, match="max_iters must be >= 0"):
        ss.solve(problem, "swaps", max_iters=-1)


def test_unknown_gpu_kernel_is_rejected():
    from sparseswaps.solvers.swaps_triton import scan_per_row_triton

    w = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="kernel must be one of auto, gluon, triton"):
        scan_per_row_triton(w, w > 0, w, torch.eye(8), None, kernel="cuda")


def test_wide_rows_stay_feasible():
    """Regression: index keys built in int8 overflowed from d = 128 on."""
    problem, _ = make_problem("outliers", rows=3, d=160, seed=8, sparsity=0.5)
    result = ss.solve(problem, "swaps")
    assert problem.is_feasible(result.mask) and result.extra["swaps_total"] > 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_engine_matches_the_torch_reference(dtype):
    """In float64 both engines take the same swaps (same ties), so masks, swap counts and objectives are
    identical. A float32 scan rounds differently in the dense torch products and numba's loops, so near-ties
    may go either way: there the check is statistical."""
    from sparseswaps.solvers import swaps_cpu

    if not swaps_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    for spec in ({"sparsity": 0.5}, {"sparsity": 0.7}):
        problem, _ = make_problem("outliers", rows=12, d=96, seed=21, **spec)
        torch_result = ss.solve(problem, "swaps", engine="torch", dtype=dtype)
        numba_result = ss.solve(problem, "swaps", engine="numba", dtype=dtype)
        if dtype == "float64":
            assert torch.equal(numba_result.mask, torch_result.mask)
            assert torch.equal(numba_result.extra["swaps"], torch_result.extra["swaps"])
            assert torch.equal(numba_result.row_objective, torch_result.row_objective)
        else:   # float32 paths may part at a near-tie: test_float32_scans_pick_the_same_pair_or_a_tie
            torch.testing.assert_close(numba_result.row_objective, torch_result.row_objective, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_float32_scans_pick_the_same_pair_or_a_tie(sparsity):
    """Along the torch engine's float32 refinement path, numba's scan picks torch's pair in every row, or
    one with the same float64 Δ up to float32 rounding."""
    from sparseswaps.solvers import swaps_cpu
    from sparseswaps.solvers.swaps import refine, scan_per_row

    if not swaps_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    problem, _ = make_problem("outliers", rows=40, d=96, seed=21, sparsity=sparsity)
    w, gram = problem.weight.float(), problem.gram.float()
    start = ss.solve(problem, "wanda").mask
    for iterations in (0, 1, 3, 10, 40):
        mask = refine(problem, start, max_iters=iterations, engine="torch").mask
        c = (problem.weight * ~mask) @ problem.gram
        got = swaps_cpu.scan_per_row_numba(w, mask, c, gram, problem.pattern)
        assert_same_pair_or_a_tie(w, mask, c, gram, got, scan_per_row(w, mask, c, gram, problem.pattern))


def exact_low(w, scale, restore, gram):
    """low[r, j] = min_i (a_ri - 2 w_ri w_rj G_ij), dense torch: what the fused kernel computes."""
    return (restore.unsqueeze(2) + scale.unsqueeze(2) * w.unsqueeze(1) * gram.unsqueeze(0)).amin(1)


def swap_state(seed, rows=16, d=48):
    problem, _ = make_problem("outliers", rows=rows, d=d, seed=seed, sparsity=0.5)
    w, gram = problem.weight.float(), problem.gram.float()
    mask = ss.solve(problem, "wanda").mask
    return w, mask, (w * ~mask) @ gram, gram, problem.pattern


@pytest.mark.parametrize("seed", range(3))
def test_filtered_scan_with_a_faithful_filter_matches_the_full_scan(seed):
    from sparseswaps.solvers.swaps import scan_filtered, scan_per_row

    w, mask, c, gram, pattern = swap_state(seed)
    noisy = lambda *args: exact_low(*args) * (1 + 1e-4 * torch.randn(len(w), w.shape[1]))  # noqa: E731
    best, i, j = scan_filtered(w, mask, c, gram, pattern, shortlist=shortlist_from_low(noisy), exact_scan=scan_per_row)
    ref_best, ref_i, ref_j = scan_per_row(w, mask, c, gram, pattern)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)
    torch.testing.assert_close(best, ref_best)


def test_a_misleading_filter_still_returns_true_deltas_of_valid_pairs():
    from sparseswaps.solvers.swaps import masked_swap_terms, scan_filtered, scan_per_row

    w, mask, c, gram, pattern = swap_state(5)
    backwards = lambda *args: -exact_low(*args)  # noqa: E731
    best, i, j = scan_filtered(w, mask, c, gram, pattern, shortlist=shortlist_from_low(backwards),
                               exact_scan=scan_per_row)
    assert (~mask.gather(1, i[:, None])).all() and mask.gather(1, j[:, None]).all()
    restore, prune = masked_swap_terms(w, mask, c, gram)
    rows = torch.arange(len(w))
    torch.testing.assert_close(best, restore[rows, i] + prune[rows, j] - 2 * w[rows, i] * w[rows, j] * gram[i, j])
    ref_best = scan_per_row(w, mask, c, gram, pattern)[0]
    assert (best >= ref_best - 1e-5 * ref_best.abs()).all()


def test_rows_where_no_candidate_improves_are_scanned_exactly():
    """At a local optimum the filter finds nothing, so every row goes to the exact scan and gets its answer."""
    from sparseswaps.solvers.swaps import scan_filtered, scan_per_row

    problem, _ = make_problem("outliers", rows=16, d=48, seed=5, sparsity=0.5)
    problem = ss.MaskProblem(problem.weight.float(), problem.gram.float(), sparsity=0.5)
    mask = ss.solve(problem, "swaps", max_iters=1000).mask
    w, gram = problem.weight, problem.gram
    rescanned = []

    def counting_scan(w, *args):
        rescanned.append(len(w))
        return scan_per_row(w, *args)

    c = (w * ~mask) @ gram
    best, i, j = scan_filtered(w, mask, c, gram, problem.pattern, shortlist=shortlist_from_low(exact_low),
                               exact_scan=counting_scan)
    ref_best, ref_i, ref_j = scan_per_row(w, mask, c, gram, problem.pattern)
    assert rescanned == [problem.rows] and (ref_best >= 0).all()
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j) and torch.equal(best, ref_best)


@pytest.mark.parametrize("engine", ["torch", "numba"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_several_swaps_per_scan_reach_a_local_optimum_in_fewer_scans(sparsity, engine):
    """Every applied swap is exact and improving; rows still stop only at a 1-swap local optimum."""
    from sparseswaps.solvers import swaps_cpu

    if engine == "numba" and not swaps_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    problem, _ = make_problem("correlated", rows=12, d=48, seed=5, sparsity=sparsity)
    start = ss.solve(problem, "wanda").mask
    paper = ss.solve(problem, "swaps", warm_start=start, max_iters=500, engine=engine)
    several = ss.solve(problem, "swaps", warm_start=start, max_iters=500, engine=engine, swaps_per_scan=8)
    assert paper.termination == several.termination == ss.Termination.LOCAL_OPTIMUM
    assert several.extra["iterations"] < paper.extra["iterations"]
    assert (several.row_objective <= problem.objective(start)).all()
    # a local optimum: the full scan finds no improving swap from either result
    from sparseswaps.solvers.swaps import scan_per_row
    for result in (paper, several):
        w = problem.weight.double()
        c = (w * ~result.mask) @ problem.gram.double()
        best, _, _ = scan_per_row(w, result.mask, c, problem.gram.double(), problem.pattern)
        assert (best >= -1e-9 * result.row_objective.clamp_min(1e-30)).all()


def test_swaps_per_scan_errors_are_clear():
    problem, _ = make_problem("iid", rows=3, d=16, seed=0, sparsity=0.5)
    with pytest.raises(ValueError, match="swaps_per_scan must be a whole number >= 1"):
        ss.solve(problem, "swaps", swaps_per_scan=0)
    nm, _ = make_problem("iid", rows=3, d=16, seed=0, pattern="2:4")
    with pytest.raises(ValueError, match="applies to per-row sparsity"):
        ss.solve(nm, "swaps", swaps_per_scan=4)


def test_scan_dtype_auto_is_float32_on_the_cpu_and_recorded():
    problem, _ = make_problem("iid", rows=3, d=16, seed=0, sparsity=0.5)
    assert ss.solve(problem, "swaps").extra["dtype"] == "float32"


def test_numba_candidate_swaps_match_the_torch_steps():
    from sparseswaps.solvers import swaps, swaps_cpu

    if not swaps_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    problem, _ = make_problem("outliers", rows=20, d=64, seed=9, sparsity=0.6)
    w64, gram64 = problem.weight.double(), problem.gram.double()
    start = ss.solve(problem, "wanda").mask
    top = torch.randint(0, 64, (20, 6), generator=torch.Generator().manual_seed(0))
    active = torch.arange(20) % 3 != 0
    states = []
    for step in (swaps.candidate_swaps_numba, swaps.candidate_swaps_torch):
        progress = swaps.Progress.start(start)
        rows = swaps.Rows.active(w64, progress, gram64, torch.float64, max_iters=1)
        step(top, active, rows, progress, gram64)
        states.append((progress.mask, rows.mask, rows.c64, progress.swaps))
    (mask_a, work_a, c_a, count_a), (mask_b, work_b, c_b, count_b) = states
    assert count_a.sum() > 0 and torch.equal(count_a, count_b)
    assert torch.equal(mask_a, mask_b) and torch.equal(work_a, work_b) and torch.equal(mask_a, work_a)
    torch.testing.assert_close(c_a, c_b, rtol=1e-12, atol=1e-9)
    assert (problem.objective(mask_a) <= problem.objective(start)).all()


@pytest.mark.parametrize("engine", ["torch", "numba"])
@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": "2:4"}])
@pytest.mark.parametrize("quantised", [False, True])
def test_every_cpu_engine_follows_the_reference_refinement(engine, spec, quantised):
    """Best improvement in float64 on every engine takes the swaps swap_formula.reference_refine takes,
    ties included (quantised weights repeat values, so equal Δ occur)."""
    from sparseswaps.solvers.swap_formula import reference_refine
    from sparseswaps.solvers.swaps import refine
    from sparseswaps.solvers import swaps_cpu

    if engine == "numba" and not swaps_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    problem, _ = make_problem("outliers", rows=6, d=24, seed=11, tokens=96, **spec)
    if quantised:
        problem = ss.MaskProblem((problem.weight * 4).round() / 4, problem.gram, check_psd=False, **spec)
    start = ss.solve(problem, "magnitude").mask
    refined = refine(problem, start, max_iters=50, dtype=torch.float64, engine=engine).mask
    group = problem.pattern.m if isinstance(problem.pattern, NM) else None
    for row in range(problem.rows):
        expected = reference_refine(problem.weight[row], problem.gram, start[row], 50, group)
        assert torch.equal(refined[row], expected), f"row {row}"
