"""Masks and weights together: `SolveResult.weight`, the `refit` and `admm` backends."""
import numpy as np
import pytest
import torch

import sparseswaps as ss
from conftest import assert_refit_scan_matches_torch, make_problem
from sparseswaps import Solution
from sparseswaps.registry import SolverError


@pytest.mark.parametrize("spec", [{"sparsity": 0.6}, {"pattern": "2:4"}])
@pytest.mark.parametrize("chain", [["wanda", "refit"], ["sparsegpt"], ["admm"], ["admm", "refit"],
                                   ["wanda", "swaps", "refit"]])
def test_weight_solvers_return_weights_inside_their_mask_and_a_float64_error(chain, spec):
    problem, _ = make_problem("correlated", rows=12, d=48, seed=2, tokens=192, **spec)
    result = ss.solve(problem, chain)
    assert problem.is_feasible(result.mask) and (result.weight[~result.mask] == 0).all()
    expected = problem.reconstruction_error(result.weight)
    assert torch.equal(result.row_weight_objective, expected)
    assert result.weight_objective == pytest.approx(float(expected.sum()), rel=1e-12)
    if chain[-1] == "refit":     # least squares on the mask can only lower the error of w ⊙ m
        assert result.weight_objective <= result.objective * (1 + 1e-9)
    assert ss.solve(problem, "wanda").weight is None


def test_refit_needs_a_mask_to_refit():
    problem, _ = make_problem("correlated", rows=4, d=16, seed=0, sparsity=0.5)
    with pytest.raises(SolverError, match="chain it after a mask solver"):
        ss.solve(problem, "refit")


@pytest.mark.parametrize("broken, message", [("outside", "nonzero where its own mask prunes"),
                                             ("nan", "non-finite"), ("shape", "not a tensor of shape")])
def test_weights_a_solver_gets_wrong_are_refused(broken, message):
    problem, _ = make_problem("correlated", rows=4, d=16, seed=0, sparsity=0.5)
    mask = ss.solve(problem, "wanda").mask

    def solver(problem, **_):
        weight = problem.weight * mask
        if broken == "outside":
            weight = problem.weight.clone()
        elif broken == "nan":
            weight[0, mask[0].nonzero()[0, 0]] = float("nan")
        else:
            weight = weight[:, :8]
        return Solution(mask, weight=weight)

    with pytest.raises(SolverError, match=message):
        ss.solve(problem, solver)


def reference_admm_per_out(weight, gram, sparsity, percdamp=0.1, iterative_prune=15, iters=20):
    """fmfi-compbio/admm-pruning lib/admm.py, AdmmPruner.fasterprune with per_out=True, line for line (float64
    instead of float32; the layer weight is [out, in] as in nn.Linear)."""
    XX = gram.clone().double()
    norm = torch.diag(XX).sqrt() + 1e-8
    XX = XX / norm
    XX = (XX.T / norm).T
    W = (weight.double() * norm).T
    rho0 = percdamp * torch.diag(XX).mean()
    diag = torch.arange(XX.shape[0])
    XX[diag, diag] += rho0
    rho = 1
    XY = XX.matmul(W)
    XX[diag, diag] += rho
    XXinv = torch.inverse(XX)
    U = torch.zeros_like(W)
    for itt in range(iters):
        if itt < iterative_prune:
            cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3
            thres = (W + U).abs().sort(dim=0)[0][int(W.shape[0] * cur_sparsity)]
            mask = ((W + U).abs() >= thres.unsqueeze(0))
        Z = (W + U) * mask
        U = U + (W - Z)
        W = XXinv.matmul(XY + rho * (Z - U))
    Z = (W + U) * mask
    return mask.T, Z.T / norm


def test_admm_is_the_reference_update_on_a_real_layer():
    from pathlib import Path

    from sparseswaps.instances import load_instances

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "instances" / "smollm2"
    instance = next(i for i in load_instances(folder) if i.d == 64)
    problem = instance.problem("50%")
    result = ss.solve(problem, "admm")
    mask, weight = reference_admm_per_out(problem.weight, problem.gram, 0.5)
    assert torch.equal(result.mask, mask)
    torch.testing.assert_close(result.weight.double(), weight, rtol=1e-9, atol=1e-12 * weight.abs().max().item())


def test_admm_option_errors_are_solver_errors():
    problem, _ = make_problem("correlated", rows=4, d=16, seed=0, sparsity=0.5)
    with pytest.raises(SolverError, match="iterative_prune <= iters"):
        ss.solve(problem, "admm", iters=5, iterative_prune=10)
    with pytest.raises(SolverError, match="rho > 0"):
        ss.solve(problem, "admm", rho=0.0)


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"sparsity": 0.75}, {"pattern": "2:4"}])
@pytest.mark.parametrize("family", ["iid", "correlated", "outliers"])
def test_no_chain_beats_the_brute_force_optimum_of_masks_and_weights(family, spec):
    """bruteforce_refit is the oracle: every chain's error with its weights is at least its per-row optimum,
    and refit on the oracle's mask gives the oracle's error."""
    problem, _ = make_problem(family, rows=4, d=12, seed=3, tokens=48, **spec)
    optimum = ss.solve(problem, "bruteforce_refit")
    assert optimum.termination == ss.Termination.OPTIMAL and problem.is_feasible(optimum.mask)
    for chain in (["wanda", "refit"], ["sparsegpt"], ["admm"], ["admm", "refit"], ["wanda", "swaps", "refit"],
                  ["bruteforce", "refit"]):
        result = ss.solve(problem, chain)
        assert (result.row_weight_objective >= optimum.row_weight_objective * (1 - 1e-9) - 1e-12).all(), chain
    again = ss.solve(problem, "refit", warm_start=optimum.mask, damping=0.0)
    torch.testing.assert_close(again.row_weight_objective, optimum.row_weight_objective, rtol=1e-8, atol=1e-10)


def test_refit_swap_gains_are_the_exact_change_of_the_refitted_error():
    from sparseswaps.solvers.bruteforce import refit_errors
    from sparseswaps.solvers.refit_swaps import swap_gains

    problem, _ = make_problem("outliers", rows=1, d=12, seed=4, tokens=48, sparsity=0.5)
    w, gram = problem.weight[0].double(), problem.gram.double()
    keep = ss.solve(problem, "wanda").mask[0]
    delta, kept, pruned, error = swap_gains(w, gram, keep)
    swapped = keep.repeat(len(kept) * len(pruned), 1)
    for a in range(len(kept)):
        for b in range(len(pruned)):
            swapped[a * len(pruned) + b, kept[a]] = False
            swapped[a * len(pruned) + b, pruned[b]] = True
    errors, _ = refit_errors(w, gram, swapped)
    assert error == pytest.approx(float(refit_errors(w, gram, keep[None])[0][0]), rel=1e-9)
    torch.testing.assert_close(delta.flatten(), errors - error, rtol=1e-7, atol=1e-9 * error)


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_refit_swaps_end_where_no_swap_lowers_the_refitted_error(spec):
    from sparseswaps.solvers.bruteforce import refit_errors

    problem, _ = make_problem("correlated", rows=3, d=12, seed=6, tokens=48, **spec)
    result = ss.solve(problem, ["wanda", "refit_swaps"])
    assert result.termination == ss.Termination.LOCAL_OPTIMUM and problem.is_feasible(result.mask)
    wanda_refit = ss.solve(problem, ["wanda", "refit"])
    assert (result.row_weight_objective <= wanda_refit.row_weight_objective * (1 + 1e-9)).all()
    gram = problem.gram.double()
    for row, keep in enumerate(result.mask):
        neighbours = []
        for i in keep.nonzero().flatten():
            for j in (~keep).nonzero().flatten():
                if "pattern" in spec and i // 4 != j // 4:
                    continue
                swapped = keep.clone()
                swapped[i], swapped[j] = False, True
                neighbours.append(swapped)
        errors, _ = refit_errors(problem.weight[row].double(), gram, torch.stack(neighbours))
        assert errors.min() >= result.row_weight_objective[row] * (1 - 1e-9)


@pytest.mark.parametrize("family", ["correlated", "outliers"])
@pytest.mark.parametrize("spec", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_batched_refit_swaps_take_the_swaps_of_the_row_by_row_reference(family, spec):
    """The rank-one-updated batch (any batch size) takes exactly the swaps of refit_swap_row, which
    re-solves the kept system from scratch at every swap."""
    from sparseswaps.solvers.refit_swaps import refit_swap_row, refit_swap_rows

    problem, _ = make_problem(family, rows=10, d=48, seed=5, tokens=200, **spec)
    start = ss.solve(problem, "magnitude").mask
    group = 4 if "pattern" in spec else None
    expected = [refit_swap_row(w, problem.gram.double(), keep, 1000, group)
                for w, keep in zip(problem.weight.double(), start)]
    for batch_rows in (None, 3):
        mask, swaps, converged = refit_swap_rows(problem.weight, problem.gram, start, 1000, group,
                                                 batch_rows=batch_rows)
        assert torch.equal(mask, torch.stack([row[0] for row in expected]))
        assert swaps.tolist() == [row[1] for row in expected] and converged.all()
    assert swaps.sum() > len(swaps)


def dead_input_problem(spec: dict) -> tuple[ss.MaskProblem, torch.Tensor]:
    """Input 3 dead (a zero row and column of G, as behind Gemma-3's zero norm channels) and kept by every row
    of the warm start, which keeps two of every four inputs."""
    problem, _ = make_problem("correlated", rows=4, d=16, seed=1, tokens=64, **spec)
    gram = problem.gram.clone()
    gram[3], gram[:, 3] = 0, 0
    keep = torch.zeros(4, 16, dtype=torch.bool)
    keep[:, 0::4] = keep[:, 3::4] = True
    return ss.MaskProblem(problem.weight, gram, **spec), keep


def test_refit_swap_gains_with_a_dead_input_are_the_exact_change_of_the_error():
    from sparseswaps.solvers.bruteforce import refit_errors
    from sparseswaps.solvers.refit_swaps import swap_gains

    dead, keep = dead_input_problem({"sparsity": 0.5})
    w, gram = dead.weight[0].double(), dead.gram.double()
    delta, kept, pruned, error = swap_gains(w, gram, keep[0])
    swapped = keep[0].repeat(len(kept) * len(pruned), 1)
    for a in range(len(kept)):
        for b in range(len(pruned)):
            swapped[a * len(pruned) + b, kept[a]] = False
            swapped[a * len(pruned) + b, pruned[b]] = True
    errors, _ = refit_errors(w, gram, swapped)
    torch.testing.assert_close(delta.flatten(), errors - error, rtol=1e-7, atol=1e-9 * error)


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_refit_swaps_take_the_reference_swaps_past_a_dead_input_without_damping(spec):
    from sparseswaps.solvers.refit_swaps import refit_swap_row

    dead, keep = dead_input_problem(spec)
    result = ss.solve(dead, "refit_swaps", warm_start=keep)
    group = 4 if "pattern" in spec else None
    expected = [refit_swap_row(w, dead.gram.double(), row, 1000, group) for w, row in zip(dead.weight.double(), keep)]
    assert torch.equal(result.mask, torch.stack([row[0] for row in expected]))
    assert result.extra["swaps"].tolist() == [row[1] for row in expected] and result.extra["swaps_total"] > 0
    assert dead.is_feasible(result.mask) and torch.isfinite(result.weight).all()


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_both_routes_to_the_kept_inverse_give_the_inverse_of_the_kept_block(damping):
    """L⁻ᵀL⁻¹ (the CUDA route) and cholesky_inverse (the CPU route) both invert G_SS + λI, a dead input alone."""
    from sparseswaps.solvers.refit_swaps import _kept_inverse

    dead, keep = dead_input_problem({"sparsity": 0.5})
    gram = dead.gram.double()
    kept = keep.nonzero()[:, 1].view(len(keep), -1)
    system = gram[kept[:, :, None], kept[:, None, :]] + damping * torch.eye(kept.shape[1], dtype=torch.float64)
    system.diagonal(dim1=1, dim2=2).masked_fill_(system.diagonal(dim1=1, dim2=2) == 0, 1.0)
    for triangular in (True, False):
        inverse = _kept_inverse(gram, kept, damping, triangular=triangular)
        identity = torch.eye(kept.shape[1], dtype=torch.float64).expand_as(inverse)
        torch.testing.assert_close(inverse @ system, identity, rtol=0, atol=1e-9)


def test_refit_swaps_stop_swapping_at_the_time_limit_and_still_refit():
    problem, _ = make_problem("correlated", rows=4, d=24, seed=2, tokens=96, sparsity=0.5)
    start = ss.solve(problem, "wanda").mask
    free = ss.solve(problem, "refit_swaps", warm_start=start)
    assert free.termination == ss.Termination.LOCAL_OPTIMUM and free.extra["swaps_total"] > 0
    cut = ss.solve(problem, "refit_swaps", warm_start=start, time_limit=1e-9)
    assert cut.termination == ss.Termination.TIME_LIMIT and cut.extra["swaps_total"] == 0
    assert torch.equal(cut.mask, start)
    refit = ss.solve(problem, "refit", warm_start=start, damping=0.0)
    torch.testing.assert_close(cut.weight, refit.weight)


def test_refit_of_a_kept_dead_input_keeps_its_weight_in_both_solves():
    """Conjugate gradients leave a dead input's weight where it starts (it changes no output); the dense
    solves behind them, for rows they leave short, do the same instead of refusing the singular block."""
    from sparseswaps.solvers.refit import _dense_least_squares, refit_weights

    dead, keep = dead_input_problem({"sparsity": 0.5})
    iterated = refit_weights(dead, keep, damping=0.0).double()
    gram = dead.gram.double()
    dense = _dense_least_squares(dead, keep, torch.arange(len(keep)), gram, (dead.weight.double() @ gram) * keep)
    torch.testing.assert_close(dense, iterated, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dense[:, 3], dead.weight[:, 3].double())


def test_refit_swaps_on_a_singular_kept_block_ask_for_damping():
    problem, _ = make_problem("correlated", rows=2, d=12, seed=1, tokens=48, sparsity=0.5)
    weight, gram = problem.weight.clone(), problem.gram.clone()
    gram[4], gram[:, 4] = gram[3], gram[:, 3]                   # input 4 repeats input 3
    weight[:, 3] = weight[:, 4] = 1.0
    repeated = ss.MaskProblem(weight, gram, sparsity=0.5, check_psd=False)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[:, :6] = True
    with pytest.raises(SolverError, match="damping"):
        ss.solve(repeated, "refit_swaps", warm_start=keep)
    result = ss.solve(repeated, "refit_swaps", warm_start=keep, damping=1e-6)
    assert repeated.is_feasible(result.mask) and torch.isfinite(result.weight).all()


@pytest.mark.parametrize("solver", ["refit", "refit_swaps"])
@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_diagonal_damping_solves_in_the_metric_g_plus_delta_diag_g(solver, spec):
    """diagonal_damping δ gives what the solver gives on G + δ diag(G) (ADMM's metric), and the weights it
    returns are not those of the plain metric."""
    problem, _ = make_problem("outliers", rows=6, d=24, seed=5, tokens=96, **spec)
    damped = ss.MaskProblem(problem.weight, problem.gram + torch.diag(0.1 * problem.gram.diagonal()), **spec)
    start = ss.solve(problem, "magnitude").mask
    got = ss.solve(problem, solver, warm_start=start, diagonal_damping=0.1)
    want = ss.solve(damped, solver, warm_start=start)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.weight, want.weight, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got.weight, ss.solve(problem, solver, warm_start=start).weight)
    with pytest.raises(SolverError, match="diagonal_damping"):
        ss.solve(problem, solver, warm_start=start, diagonal_damping=-1.0)


@pytest.mark.parametrize("spec, group", [({"sparsity": 0.5}, None), ({"sparsity": 0.7}, None), ({"pattern": "2:4"}, 4),
                                         ({"pattern": "2:3"}, 3)])
def test_numba_refit_scan_picks_the_torch_scans_swap_bit_for_bit(spec, group):
    """The numba scan of refit_swaps gives the torch scan's best Δ and slots exactly (conftest)."""
    from sparseswaps.solvers import refit_cpu

    if not refit_cpu.AVAILABLE:
        pytest.skip("needs numba")
    assert_refit_scan_matches_torch("numba", spec, group, d=48)


@pytest.mark.parametrize("spec", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_refit_swaps_engines_on_the_cpu_take_the_same_swaps(spec):
    from sparseswaps.solvers import refit_cpu

    if not refit_cpu.AVAILABLE:
        pytest.skip("needs numba")
    problem, _ = make_problem("correlated", rows=12, d=64, seed=5, tokens=256, **spec)
    start = ss.solve(problem, "magnitude").mask
    torch_run, numba_run = (ss.solve(problem, "refit_swaps", warm_start=start, engine=engine, diagonal_damping=0.01)
                            for engine in ("torch", "numba"))
    assert torch.equal(torch_run.mask, numba_run.mask) and torch_run.extra["swaps_total"] > problem.rows
    assert torch_run.extra["swaps"].tolist() == numba_run.extra["swaps"].tolist()


@pytest.mark.parametrize("engine, message", [("fast", "one of auto, torch, triton"),
                                             pytest.param("triton", "CUDA", marks=pytest.mark.skipif(
                                                 torch.cuda.is_available(), reason="CUDA can run it"))])
def test_refit_swaps_engine_errors_say_what_runs_where(engine, message):
    problem, _ = make_problem("correlated", rows=2, d=12, seed=1, tokens=48, sparsity=0.5)
    with pytest.raises(SolverError, match=message):
        ss.solve(problem, "refit_swaps", engine=engine)


@pytest.mark.parametrize("perspective", [False, True], ids=["big-M", "perspective"])
@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": "2:4"}])
def test_scip_refit_reaches_the_masks_and_weights_optimum_with_a_bound(spec, perspective):
    """SCIP's MIQP of masks and weights together (either formulation) ends at the brute-force optimum of
    weight_objective, with a valid bound on it within its relative gap, from a poor incumbent too."""
    pytest.importorskip("pyscipopt")
    for family in ("correlated", "outliers"):
        problem, _ = make_problem(family, rows=3, d=12, seed=2, tokens=48, **spec)
        optimum = ss.solve(problem, "bruteforce_refit")
        for start in (None, ss.solve(problem, "magnitude").mask):
            result = ss.solve(problem, "scip_refit", warm_start=start, row_time_limit=60, perspective=perspective)
            assert result.termination in (ss.Termination.OPTIMAL, ss.Termination.GAP_LIMIT), result.message
            torch.testing.assert_close(result.row_weight_objective, optimum.row_weight_objective, rtol=1e-8, atol=0)
            assert (result.row_weight_bound <= optimum.row_weight_objective * (1 + 1e-12)).all()
            # SCIP's tolerances, given away, are absolute in units of the incumbent's error
            begin = start if start is not None else ss.solve(problem, ["wanda", "refit_swaps"]).mask   # its default
            incumbent = ss.solve(problem, "refit", warm_start=begin)
            ratio = float((incumbent.row_weight_objective / optimum.row_weight_objective).max())
            assert result.weight_gap <= 1e-6 * ratio and result.row_bound is None


def test_perspective_shift_is_positive_and_leaves_a_positive_definite_rest():
    from sparseswaps.solvers.scip_refit import perspective_shift

    for family in ("correlated", "outliers"):
        gram = make_problem(family, rows=2, d=24, seed=4, tokens=96, sparsity=0.5)[0].gram.double().numpy()
        shift = perspective_shift(gram)
        largest = np.linalg.eigvalsh(gram)[-1]
        assert (shift > 0).all() and np.linalg.eigvalsh(gram - np.diag(shift))[0] > 1e-6 * largest



def test_perspective_shift_of_an_ill_conditioned_gram_still_shifts_most_inputs():
    """Two nearly collinear inputs put G's smallest eigenvalue below 1e-6 of its largest, as on a real
    96-input gate_proj; the shift must still reach the other inputs and keep G - diag(δ) positive definite."""
    from sparseswaps.solvers.scip_refit import perspective_shift

    gram = make_problem("correlated", rows=2, d=24, seed=4, tokens=96, sparsity=0.5)[0].gram.double().numpy()
    gram[:, 1] = gram[1, :] = gram[0] * 0.999      # input 1 nearly a copy of input 0
    gram[1, 1] = gram[0, 0] * 0.999 ** 2 * (1 + 1e-8)
    eigenvalues = np.linalg.eigvalsh(gram)
    assert 0 < eigenvalues[0] < 1e-6 * eigenvalues[-1]
    shift = perspective_shift(gram)
    assert (shift > 0).sum() >= len(gram) // 2 and np.linalg.eigvalsh(gram - np.diag(shift))[0] >= 0.5 * eigenvalues[0]

def test_scip_refit_says_what_perspective_takes():
    pytest.importorskip("pyscipopt")
    problem, _ = make_problem("correlated", rows=2, d=12, seed=1, tokens=48, sparsity=0.5)
    with pytest.raises(SolverError, match="true or false"):
        ss.solve(problem, "scip_refit", perspective="yes")


def test_scip_refit_refuses_a_singular_gram():
    pytest.importorskip("pyscipopt")
    problem, _ = make_problem("correlated", rows=2, d=12, seed=1, tokens=48, sparsity=0.5)
    gram = problem.gram.clone()
    gram[3], gram[:, 3] = 0, 0
    with pytest.raises(SolverError, match="singular"):
        ss.solve(ss.MaskProblem(problem.weight, gram, sparsity=0.5), "scip_refit")


def reference_alps_nm(W, XtX, nm_n, nm_m, rho=0.1, max_iter=300, update_iter=3, switch_iter=30):
    """mazumder-lab/ALPS alps.py, ALPS_prune.ALPS_admm, its N:M branch line for line in float64 on the CPU
    (nm_n kept of every nm_m), up to the final projection; returns the keep mask [rows, d]."""
    XtX = XtX.double().clone()
    W = W.double()
    damp1 = 0.01 * torch.mean(torch.diag(XtX)).item()
    diag = torch.arange(XtX.shape[0])
    XtX[diag, diag] += damp1
    X_norm = torch.diag(XtX).sqrt() + 1e-8
    XtX = XtX / X_norm
    XtX = (XtX.T / X_norm).T
    YtX = torch.matmul(W * X_norm, XtX)
    B = (W * X_norm).t().clone()
    B_orig = B.clone()
    V = torch.zeros_like(B)
    totp, num_cout = B.shape
    L, Q = torch.linalg.eigh(XtX)
    XTX_inv = Q @ ((1 / (L + rho)) * Q).T
    init_rho = False
    new_dim = int(totp * num_cout / nm_m)
    k_spar = totp * num_cout * nm_n / nm_m

    def project(M):
        M = M.t().reshape((new_dim, nm_m))
        _, loss_idx = torch.topk(-M ** 2, nm_m - nm_n, dim=1)
        M = M.scatter(src=torch.zeros((new_dim, nm_m - nm_n), dtype=M.dtype), dim=1, index=loss_idx)
        return M, (M == 0).to(torch.float64)

    D, D_suppp = project(B)
    D = D.reshape(num_cout, totp).t()
    D_init = D.clone()
    D_supp = D_suppp
    for i_admm in range(max_iter):
        B = XTX_inv @ (YtX.T - V + rho * D)
        D, D_supp = project((V + rho * B) / rho)
        D = D.reshape(num_cout, totp).t()
        V = V + rho * (B - D)
        if (i_admm + 1) % update_iter == 0:
            supp_change = torch.sum((D_supp - D_suppp) ** 2)
            if supp_change / k_spar > 0.1:
                init_rho = True
                rho *= 1.3
            elif supp_change / k_spar > 0.005:
                init_rho = True
                rho *= 1.2
            elif supp_change > 0.5:
                if init_rho:
                    rho *= 1.1
                else:
                    rho /= 5
                    B = B_orig.clone()
                    D = D_init.clone()
                    V = torch.zeros_like(B)
            else:
                if init_rho:
                    break
                else:
                    rho /= 5
            D_suppp = D_supp.clone()
            if rho > 1e6:
                rho = 1e6
            XTX_inv = Q @ ((1 / (L + rho)) * Q).T
            if i_admm >= switch_iter and supp_change / k_spar < 0.0003:
                break
    B, _ = project(B)
    return B.reshape(num_cout, totp) != 0


@pytest.mark.parametrize("source", ["real", "synthetic"])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_alps_is_the_reference_admm_on_n_m_patterns(source, n, m):
    from test_parity import layer

    weight, gram = layer(source)
    problem = ss.MaskProblem(weight, gram, pattern=f"{n}:{m}", check_psd=False)
    result = ss.solve(problem, "alps")
    assert torch.equal(result.mask, reference_alps_nm(weight, gram, n, m))
    assert result.extra["admm_iterations"] > 3
    exact = ss.solve(problem, "refit", warm_start=result.mask)
    torch.testing.assert_close(result.weight, exact.weight)     # least squares on ALPS's mask


def test_alps_option_errors_are_solver_errors():
    problem, _ = make_problem("correlated", rows=4, d=16, seed=0, sparsity=0.5)
    with pytest.raises(SolverError, match="alps needs rho > 0"):
        ss.solve(problem, "alps", rho=0.0)


def test_refit_swap_rows_refuse_warm_starts_they_cannot_batch():
    """Rows keeping different counts, or N:M groups keeping different counts, get an error that says so."""
    from sparseswaps.solvers.refit_swaps import refit_swap_rows

    problem, _ = make_problem("correlated", rows=2, d=8, seed=1, tokens=32, sparsity=0.5)
    uneven = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(SolverError, match="same number of kept inputs in every row"):
        refit_swap_rows(problem.weight, problem.gram, uneven, 10)
    lopsided = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    with pytest.raises(SolverError, match="every N:M group"):
        refit_swap_rows(problem.weight, problem.gram, lopsided, 10, group=4)


def test_refit_swap_rows_with_nothing_to_swap_return_the_warm_start():
    from sparseswaps.solvers.refit_swaps import refit_swap_rows

    problem, _ = make_problem("correlated", rows=2, d=8, seed=1, tokens=32, sparsity=0.5)
    for keep in (torch.ones(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.bool)):
        mask, swaps, converged = refit_swap_rows(problem.weight, problem.gram, keep, 10)
        assert torch.equal(mask, keep) and swaps.sum() == 0 and converged.all()
