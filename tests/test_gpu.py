"""GPU checks: the fused Triton scan against the torch reference, and the pipeline on CUDA against CPU. Skipped without CUDA."""
import pytest
import torch

import sparseswaps as ss
from conftest import assert_refit_scan_matches_torch, assert_same_pair_or_a_tie, make_problem, with_dead_input
from sparseswaps import PerRow, mask_from_scores

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def random_state(rows, d, keep, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(4 * d, d, device="cuda", generator=generator)
    x[:, :4] *= 20
    gram = x.T @ x
    w = torch.randn(rows, d, device="cuda", generator=generator)
    mask = mask_from_scores(torch.rand(rows, d, device="cuda", generator=generator), PerRow(keep))
    return w, mask, (w * ~mask) @ gram, gram


@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("rows, d, keep", [(7, 64, 32), (33, 200, 80), (128, 576, 288), (5, 1000, 700),
                                           (9, 130, 65)])   # 130: a width the unrolled i loop does not divide
def test_triton_scan_matches_the_reference(rows, d, keep, kernel):
    from sparseswaps.solvers.swaps import scan_per_row
    from sparseswaps.solvers.swaps_triton import scan_per_row_triton

    for seed in range(3):
        w, mask, c, gram = random_state(rows, d, keep, seed)
        ref_best, ref_i, ref_j = scan_per_row(w, mask, c, gram, PerRow(keep))
        best, i, j = scan_per_row_triton(w, mask, c, gram, PerRow(keep), kernel=kernel)
        torch.testing.assert_close(best, ref_best, rtol=1e-5, atol=1e-5 * ref_best.abs().max().item())
        assert_same_pair_or_a_tie(w, mask, c, gram, (best, i, j), (ref_best, ref_i, ref_j))


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"sparsity": 0.6}, {"sparsity": 0.7}, {"pattern": "2:4"}])
def test_triton_refinement_agrees_with_the_reference_after_each_iteration(spec):
    problem, _ = make_problem("outliers", rows=64, d=256, seed=3, **spec)
    problem = problem.to("cuda")
    start = ss.solve(problem, "wanda").mask
    for iterations in (1, 2, 5, 100):
        ref = ss.solve(problem, "swaps", warm_start=start, max_iters=iterations, engine="torch")
        fused = ss.solve(problem, "swaps", warm_start=start, max_iters=iterations, engine="auto")
        torch.testing.assert_close(fused.row_objective, ref.row_objective, rtol=1e-6, atol=0)


def test_out_of_memory_halves_the_batch(monkeypatch):
    from sparseswaps.solvers import swaps

    problem, _ = make_problem("correlated", rows=40, d=128, seed=1, sparsity=0.5)
    problem = problem.to("cuda")
    real = swaps.swaps_triton.scan_per_row_triton

    def flaky(w, *args):
        if len(w) > 10:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(w, *args)

    monkeypatch.setattr(swaps.swaps_triton, "scan_per_row_triton", flaky)
    result = ss.solve(problem, "swaps")
    reference = ss.solve(problem, "swaps", engine="torch")
    assert result.extra["batch_rows"] <= 10
    torch.testing.assert_close(result.row_objective, reference.row_objective, rtol=1e-6, atol=0)


def test_pipeline_on_cuda_matches_cpu(tmp_path):
    """Activations staged on the GPU give the CPU run's masks and perplexities (tiny Gemma-3: per-block kwargs)."""
    from sparseswaps.checkpoint import load_masks
    from sparseswaps.pipeline import PruneConfig, prune_model
    from tiny_models import save_tiny

    tiny = save_tiny(tmp_path / "gemma3", "gemma3")
    # best improvement: several swaps per scan follow engine-specific candidate orders, not what this checks
    settings = dict(model=str(tiny), sparsity=0.5, nsamples=4, seqlen=64, eval=("wikitext2",), eval_windows=4,
                    solver_options={"swaps_per_scan": 1})
    runs = {device: prune_model(PruneConfig(device=device, **settings), save=tmp_path / device, checkpointing=False)
            for device in ("cpu", "cuda")}
    cpu, cuda = (load_masks(tmp_path / d / "masks.safetensors") for d in ("cpu", "cuda"))
    agreement = sum(int((cpu[k] == cuda[k]).sum()) for k in cpu) / sum(m.numel() for m in cpu.values())
    assert agreement > 0.99   # float32 Grams summed in another order may flip near-ties
    for corpus, entry in runs["cpu"]["perplexity"]["pruned"].items():
        assert runs["cuda"]["perplexity"]["pruned"][corpus]["ppl"] == pytest.approx(entry["ppl"], rel=0.02)


@pytest.mark.parametrize("rows, d, keep", [(7, 64, 32), (128, 576, 288), (9, 130, 65)])
def test_float16_filter_estimates_the_float32_scan(rows, d, keep):
    from sparseswaps.solvers.swaps import masked_swap_terms
    from sparseswaps.solvers.swaps_triton import tile_minima

    for seed in range(3):
        w, mask, c, gram = random_state(rows, d, keep, seed)
        restore, _ = masked_swap_terms(w, mask, c, gram)
        exact, estimate = tile_minima(w, mask, c, gram), tile_minima(w, mask, c, gram, half=True)
        # float16 keeps ~3 significant digits of the row's largest term
        row_scale = torch.maximum(torch.where(restore.isinf(), 0, restore).abs().amax(1),
                                  (2 * w.abs().amax(1) ** 2 * gram.abs().max()))
        error = torch.where(exact.isinf() & estimate.isinf(), 0, estimate - exact).abs().amax(1)
        assert (error <= 4e-3 * row_scale).all()


@pytest.mark.parametrize("rows, d, keep", [(7, 64, 32), (33, 200, 80), (9, 130, 65)])
def test_operand_kernels_match_torch(rows, d, keep):
    """_terms_kernel gives torch's a and b from a float64 c; _rescore_kernel the torch re-scoring;
    _update_c_kernel torch's update of c."""
    from sparseswaps.solvers.swaps import apply_swaps, masked_swap_terms, rescore_candidates
    from sparseswaps.solvers.swaps_triton import rescore, scan_terms

    w, mask, c, gram = random_state(rows, d, keep, 0)
    c64 = c.double()
    restore, prune = masked_swap_terms(w, mask, c64, gram)
    terms = scan_terms(w, mask, c64, gram)
    scale = torch.where(restore.isinf(), 0, restore).abs().max().item()
    torch.testing.assert_close(terms.restore, restore, rtol=1e-5, atol=1e-6 * scale)   # FMA contraction
    torch.testing.assert_close(terms.prune, prune, rtol=1e-5, atol=1e-6 * scale)
    assert torch.equal(terms.scale_t[:d], (-2 * w).T) and terms.restore_t[d:].isinf().all()
    generator = torch.Generator(device="cuda").manual_seed(1)
    kept = [row.nonzero().flatten() for row in mask]
    top = torch.stack([k[torch.randperm(len(k), device="cuda", generator=generator)[:4]].sort().values for k in kept])
    best, i, j = rescore(w, terms, gram, top)
    ref_best, ref_i, ref_j = rescore_candidates(w, -2 * w, restore, prune, gram, top)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)
    torch.testing.assert_close(best, ref_best)
    improving = torch.arange(rows, device="cuda") % 2 == 0
    w64, gram64, reference, swapped = w.double(), gram.double(), c64.clone(), mask.clone()
    apply_swaps(swapped, c64, w64, gram64, i, j, improving)
    rows_ = improving.nonzero().flatten()
    reference[rows_] += w64[rows_, j[rows_], None] * gram64[j[rows_]] - w64[rows_, i[rows_], None] * gram64[i[rows_]]
    torch.testing.assert_close(c64, reference, rtol=1e-12, atol=1e-9)
    assert torch.equal(swapped[~improving], mask[~improving])
    assert swapped[rows_, i[rows_]].all() and not swapped[rows_, j[rows_]].any()


@pytest.mark.parametrize("rows, d, keep, k", [(7, 64, 32, 4), (33, 200, 80, 16), (5, 2100, 1050, 8)])
def test_candidate_kernel_applies_the_swaps_of_the_torch_reference(rows, d, keep, k):
    """swaps_triton.candidate_swaps (one program per row, float64) restores and prunes what
    candidate_swaps_torch does, and leaves c = G (w ⊙ ¬m) as it does; inactive rows and candidates that are
    no longer kept are left alone."""
    from sparseswaps.solvers.swaps import Progress, Rows, candidate_swaps_torch
    from sparseswaps.solvers.swaps_triton import candidate_swaps

    w, mask, _, gram = random_state(rows, d, keep, 2)
    w64, gram64 = w.double(), gram.double()
    generator = torch.Generator(device="cuda").manual_seed(3)
    top = torch.stack([torch.randperm(d, device="cuda", generator=generator)[:k] for _ in range(rows)])
    active = torch.arange(rows, device="cuda") % 3 != 1
    states = []
    for apply in (candidate_swaps_torch, candidate_swaps):
        progress = Progress.start(mask)
        working = Rows.active(w64, progress, gram64, torch.float64, max_iters=1)
        apply(top, active, working, progress, gram64)
        states.append((working.mask, progress.mask, working.c64, progress.swaps))
    (ref_mask, ref_full, ref_c, ref_swaps), (got_mask, got_full, got_c, got_swaps) = states
    assert torch.equal(got_mask, ref_mask) and torch.equal(got_full, ref_full) and torch.equal(got_swaps, ref_swaps)
    assert ref_swaps.sum() > 0 and (ref_swaps[~active] == 0).all()
    torch.testing.assert_close(got_c, (w64 * ~got_mask) @ gram64, rtol=1e-10, atol=1e-8 * ref_c.abs().max().item())


@pytest.mark.parametrize("spec", [{"sparsity": 0.5}, {"sparsity": 0.7}])
def test_float16_refinement_stops_at_a_float32_local_optimum(spec):
    problem, _ = make_problem("outliers", rows=64, d=256, seed=3, **spec)
    problem = problem.to("cuda")
    start = ss.solve(problem, "wanda").mask
    half = ss.solve(problem, "swaps", warm_start=start, max_iters=1000, dtype="float16")
    exact = ss.solve(problem, "swaps", warm_start=start, max_iters=1000)
    assert half.termination == ss.Termination.LOCAL_OPTIMUM and problem.is_feasible(half.mask)
    assert half.objective <= ss.solve(problem, "wanda").objective
    again = ss.solve(problem, "swaps", warm_start=half.mask, max_iters=1000)
    assert again.extra["swaps_total"] == 0            # the exact float32 scan finds no improving swap either
    assert abs(half.objective - exact.objective) <= 0.01 * exact.objective


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_several_swaps_per_scan_on_cuda_end_at_a_float32_local_optimum_in_fewer_scans(dtype):
    from sparseswaps.solvers.swaps import scan_per_row

    problem, _ = make_problem("outliers", rows=48, d=256, seed=4, sparsity=0.5)
    problem = ss.MaskProblem(problem.weight.float().cuda(), problem.gram.float().cuda(), sparsity=0.5)
    start = ss.solve(problem, "wanda").mask
    paper = ss.solve(problem, "swaps", warm_start=start, max_iters=2000, dtype=dtype)
    several = ss.solve(problem, "swaps", warm_start=start, max_iters=2000, dtype=dtype, swaps_per_scan=8)
    assert several.termination == paper.termination == ss.Termination.LOCAL_OPTIMUM
    assert several.extra["iterations"] < paper.extra["iterations"]
    assert several.objective <= ss.solve(problem, "wanda").objective
    w = problem.weight.double()
    c = (w * ~several.mask) @ problem.gram.double()
    best, _, _ = scan_per_row(w.float(), several.mask, c, problem.gram, problem.pattern)
    assert (best >= -1e-4 * several.row_objective.float().clamp_min(1e-12)).all()


def test_scan_dtype_auto_takes_the_float16_filter_for_wide_rows_on_cuda():
    from sparseswaps.solvers.swaps import HALF_MIN_WIDTH
    from sparseswaps.solvers.swaps_triton import GLUON

    for d, expected in ((576, "float32"), (HALF_MIN_WIDTH, "float16" if GLUON else "float32")):
        w, mask, _, gram = random_state(4, d, d // 2, 0)
        problem = ss.MaskProblem(w, gram, sparsity=0.5)
        assert ss.solve(problem, "swaps", max_iters=2).extra["dtype"] == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_the_float32_gram_on_tensor_cores(dtype):
    """accumulate_gram's tensor-core route equals float32 accumulation of the upcast inputs up to
    summation order: both within float32 rounding of the float64 sums."""
    from sparseswaps.calibration import accumulate_gram

    generator = torch.Generator(device="cuda").manual_seed(0)
    chunks = [(torch.randn(512, 384, device="cuda", generator=generator) * 4).to(dtype) for _ in range(3)]
    fast, upcast = (torch.zeros(384, 384, device="cuda") for _ in range(2))
    reference = torch.zeros(384, 384, device="cuda", dtype=torch.float64)
    for x in chunks:
        accumulate_gram(fast, x)
        upcast.addmm_(x.float().T, x.float())
        reference.addmm_(x.double().T, x.double())
    scale = reference.abs().max().item()
    for gram in (fast, upcast):
        assert gram.dtype == torch.float32
        assert (gram.double() - reference).abs().max().item() <= 1e-5 * scale


def test_speed_converts_a_two_four_model_and_keeps_its_perplexity(tmp_path):
    """`sparseswaps speed` on a 2:4-pruned bf16 model: every block linear converted, perplexity of the
    semi-structured model equal to the dense-with-zeros model's within bf16 rounding, throughput reported."""
    import json

    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparseswaps import NM, cli
    from sparseswaps.speed import block_linears
    from tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=400, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config).eval()
    layers = block_linears(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.mul_(mask_from_scores(layer.weight.abs(), NM(2, 4)))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    out = tmp_path / "speed.json"
    assert cli.main(["speed", "--model", str(tmp_path / "model"), "--batch", "2", "--prefill", "128", "--prompt",
                     "32", "--decode", "4", "--repeats", "2", "--warmup", "1", "--eval-windows", "2", "--seqlen",
                     "128", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["layers_converted"] == len(layers) == 14
    dense, sparse = result["measured"]["dense with zeros"], result["measured"]["2:4 semi-structured"]
    assert sparse["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-2)
    assert all(entry[phase]["tokens_per_s"] > 0 for entry in (dense, sparse) for phase in ("prefill", "decode"))


@pytest.mark.parametrize("spec", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_refit_swaps_on_cuda_take_the_reference_swaps(spec):
    """The batched, rank-one-updated refit_swaps on the GPU take exactly the swaps of the row-by-row
    reference on the CPU, and end at its weights."""
    from sparseswaps.solvers.refit_swaps import refit_swap_row

    problem, _ = make_problem("outliers", rows=24, d=128, seed=7, tokens=512, **spec)
    start = ss.solve(problem, "magnitude").mask
    group = 4 if "pattern" in spec else None
    expected = torch.stack([refit_swap_row(w, problem.gram.double(), keep, 1000, group)[0]
                            for w, keep in zip(problem.weight.double(), start)])
    result = ss.solve(problem.to("cuda"), "refit_swaps", warm_start=start.cuda())
    assert result.termination == ss.Termination.LOCAL_OPTIMUM and result.extra["swaps_total"] > problem.rows
    assert torch.equal(result.mask.cpu(), expected)
    torch.testing.assert_close(result.weight.cpu(), ss.solve(problem, "refit", warm_start=expected, damping=0.0).weight,
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_refit_swaps_on_cuda_past_a_dead_input_take_the_cpu_swaps(spec):
    """A dead input (zero row and column of G) kept by the warm start: both engines on the GPU take the swaps
    of the CPU run, with no damping."""
    problem, _ = make_problem("outliers", rows=24, d=128, seed=7, tokens=512, **spec)
    dead, start = with_dead_input(problem, 5)
    on_cpu = ss.solve(dead, "refit_swaps", warm_start=start)
    assert on_cpu.extra["swaps_total"] > problem.rows
    for engine in ("torch", "triton"):
        on_gpu = ss.solve(dead.to("cuda"), "refit_swaps", warm_start=start.cuda(), engine=engine)
        assert torch.equal(on_gpu.mask.cpu(), on_cpu.mask), engine
        assert on_gpu.extra["swaps"].tolist() == on_cpu.extra["swaps"].tolist(), engine


@pytest.mark.parametrize("spec, group", [({"sparsity": 0.5}, None), ({"sparsity": 0.7}, None), ({"pattern": "2:4"}, 4),
                                         ({"pattern": "2:3"}, 3)])
def test_fused_refit_scan_picks_the_torch_scans_swap_bit_for_bit(spec, group):
    """The Triton scan of refit_swaps (without fused multiply-adds) gives the torch scan's best Δ and slots
    exactly, along a refinement path, ties included (every input appears twice)."""
    assert_refit_scan_matches_torch("triton", spec, group, d=96, device="cuda")
