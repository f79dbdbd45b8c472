"""The streaming pipeline: lazy per-block loading, shared Grams, checkpoints that survive a kill anywhere."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sparseswaps import checkpoint as ckpt
from sparseswaps import cli
from sparseswaps.calibration import capture_block_inputs, gram_groups, target_linears
from sparseswaps.checkpoint import pack_mask, unpack_mask
from sparseswaps.models import load_model, open_model
from sparseswaps.pipeline import PruneConfig, prune_group, prune_model
from test_pipeline import assert_same_folders
from tiny_models import tiny_model, tiny_tokenizer

SETTINGS = dict(sparsity=0.6, nsamples=4, seqlen=64, eval=("wikitext2",), eval_windows=3)


def save_sharded(path, family="llama", dtype=torch.float32):
    """A tiny model saved in several shards, as large checkpoints are."""
    tiny_model(family).to(dtype).save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_sharded(tmp_path_factory.mktemp("sharded") / "llama")


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_lazy_model_computes_what_the_eager_model_does(family, tmp_path):
    path = save_sharded(tmp_path / family, family)
    lazy = open_model(str(path))
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_model(family)(ids).logits
        assert torch.equal(lazy.materialize("cpu")(ids).logits, expected)


def test_blocks_are_released_after_use(sharded):
    lazy = open_model(str(sharded))
    lazy.load_block(1, "cpu")
    assert all(p.device.type == "cpu" for p in lazy.blocks[1].parameters())
    assert all(p.device.type == "meta" for p in lazy.blocks[0].parameters())
    lazy.release_block(1)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())


def test_storage_dtype_follows_the_checkpoint(tmp_path):
    lazy = open_model(str(save_sharded(tmp_path / "bf16", dtype=torch.bfloat16)))
    assert lazy.dtype == torch.bfloat16 and lazy.info["dtype"] == "bfloat16"
    assert open_model(str(tmp_path / "bf16"), torch.float32).dtype == torch.float32


def test_layers_reading_one_input_share_one_gram(sharded):
    lazy = open_model(str(sharded))
    lazy.load_outer("cpu")
    inputs = capture_block_inputs(lazy.model, lazy.blocks, torch.randint(0, 400, (3, 32)))
    lazy.load_block(0, "cpu")
    layers = target_linears(lazy.blocks[0], "model.layers.0")
    groups = {tuple(name.rsplit(".", 1)[1] for name in g.names): g for g in
              gram_groups(lazy.blocks[0], layers, inputs.hidden, inputs.kwargs[0], "cpu")}
    assert set(groups) == {("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}
    # the shared Gram is the Gram of the block's normalised input, which q/k/v all read
    x = torch.cat([lazy.blocks[0].input_layernorm(h).reshape(-1, 64) for h in inputs.hidden])
    torch.testing.assert_close(groups[("q_proj", "k_proj", "v_proj")].statistics.gram, x.T @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("target", [dict(sparsity=0.6), dict(pattern="2:4")])
@pytest.mark.parametrize("chain", [("wanda", "swaps"), (None, "sparsegpt")])
def test_stacked_rows_give_the_separate_solves(sharded, target, chain):
    from sparseswaps.calibration import GramAccumulator

    torch.manual_seed(0)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    statistics = GramAccumulator(64, "cpu")
    statistics.hook(None, (x,), None)
    weights = [torch.randn(48, 64), torch.randn(16, 64), torch.randn(16, 64)]
    config = PruneConfig(warm_start=chain[0], solver=chain[1], **target).resolved()
    names = ["q", "k", "v"]
    rows, masks, new = prune_group(names, weights, statistics, config, torch.device("cpu"))
    for index, name in enumerate(names):
        alone_rows, alone_masks, alone_new = prune_group([name], [weights[index]], statistics, config,
                                                         torch.device("cpu"))
        assert torch.equal(masks[index], alone_masks[0]) and torch.equal(new[index], alone_new[0])
        assert rows[index]["objective"] == pytest.approx(alone_rows[0]["objective"], rel=1e-12)


def test_masks_pack_into_bits():
    for d in (1, 7, 8, 13, 64):
        mask = torch.rand(5, d, generator=torch.Generator().manual_seed(d)) < 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-d // 8))
        assert torch.equal(unpack_mask(packed, d), mask)


def test_checkpoint_writes_at_most_the_block_weights_and_packed_masks(sharded, tmp_path):
    lazy = open_model(str(sharded))
    with pytest.raises(KeyboardInterrupt):
        prune_model(PruneConfig(model=str(sharded), **SETTINGS), tmp_path / "r.json", stop_after_block=0)
    written = (tmp_path / "r.json.checkpoint" / "block_00000.safetensors").stat().st_size
    linear_bytes = sum(m.weight.numel() for m in target_linears(lazy.blocks[0], "x").values())
    assert written <= lazy.block_bytes(0) + linear_bytes // 8 + 4096   # + the safetensors header


class Killed(BaseException):
    """A kill -9 in the middle of a commit: nothing after it runs, no handler sees it."""


def count_commit_steps(monkeypatch, kill_at=None):
    """Patch the checkpoint's durable renames (each one step of a commit); raise Killed at step `kill_at`."""
    steps = []
    original = ckpt._replace

    def replace(temporary, target):
        steps.append(target.name)
        if len(steps) == kill_at:
            temporary.write_bytes(temporary.read_bytes()[:7])   # and leave a torn temporary behind
            raise Killed(target.name)
        original(temporary, target)

    monkeypatch.setattr(ckpt, "_replace", replace)
    return steps


def test_a_kill_at_every_step_of_every_commit_resumes_to_the_identical_result(sharded, tmp_path, monkeypatch):
    config = PruneConfig(model=str(sharded), **SETTINGS)
    steps = count_commit_steps(monkeypatch)
    reference = prune_model(config, tmp_path / "ref.json", tmp_path / "ref")
    checkpoint_steps = [s for s in steps if not s.startswith(("ref", "model", "masks", "sparseswaps"))]
    assert checkpoint_steps[:3] == ["run.json", "dense.json", "warm_start.json"]
    assert len(checkpoint_steps) == 3 + 2 * 2   # and two files per block
    for kill_at in range(1, len(checkpoint_steps) + 1):
        run = tmp_path / f"kill{kill_at}"
        count_commit_steps(monkeypatch, kill_at)
        with pytest.raises(Killed):
            prune_model(config, run / "r.json", run / "model")
        count_commit_steps(monkeypatch)
        resumed = prune_model(config, run / "r.json", run / "model", resume=True)
        assert resumed["perplexity"] == reference["perplexity"], kill_at
        assert_same_folders(tmp_path / "ref", run / "model")
        assert not (run / "r.json.checkpoint").exists()


def prune_cli(capsys, model, out, *extra):
    code = cli.main(["prune", "--model", str(model), "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2",
                     "--out", str(out), *extra])
    return code, capsys.readouterr().err


def copy_folder(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_missing_or_truncated_shard_is_a_clear_error(sharded, tmp_path, capsys):
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    missing = copy_folder(sharded, tmp_path / "missing")
    (missing / shards[1].name).unlink()
    code, err = prune_cli(capsys, missing, tmp_path / "a.json")
    assert code == 2 and f"shard {shards[1].name}" in err and "is missing" in err
    truncated = copy_folder(sharded, tmp_path / "truncated")
    data = (truncated / shards[1].name).read_bytes()
    (truncated / shards[1].name).write_bytes(data[:len(data) // 2])
    code, err = prune_cli(capsys, truncated, tmp_path / "b.json")
    assert code == 2 and "damaged or truncated" in err
    assert not any(tmp_path.glob("*.json*"))


def interrupted_run(model, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prune_model(PruneConfig(model=str(model), nsamples=4, seqlen=64, eval_windows=2), tmp_path / "r.json",
                    stop_after_block=0)
    return tmp_path / "r.json.checkpoint"


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_checkpoint_of_another_configuration_is_refused_untouched(sharded, tmp_path, capsys):
    checkpoint = interrupted_run(sharded, tmp_path)
    before = folder_bytes(checkpoint)
    code, err = prune_cli(capsys, sharded, tmp_path / "r.json", "--resume", "--sparsity", "0.7")
    assert code == 2 and "different configuration" in err
    assert folder_bytes(checkpoint) == before and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "notes.txt").write_text("mine"), "foreign file notes.txt"),
    (lambda c: (c / "block_00000.safetensors").write_bytes(b"\0" * 64), "does not match its commit record"),
    (lambda c: (c / "block_00000.json").write_text("{not json"), "is corrupted"),
    (lambda c: (c / "block_00003.json").write_text("{}"), "has block 3 but not block 1"),
])
def test_foreign_or_corrupted_checkpoint_files_are_refused_untouched(sharded, tmp_path, capsys, damage, message):
    checkpoint = interrupted_run(sharded, tmp_path)
    damage(checkpoint)
    before = folder_bytes(checkpoint)
    code, err = prune_cli(capsys, sharded, tmp_path / "r.json", "--resume")
    assert code == 2 and message in err, err
    assert folder_bytes(checkpoint) == before and not (tmp_path / "r.json").exists()


def test_saved_model_loads_with_transformers_and_matches_the_report(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    prune_model(PruneConfig(model=str(sharded), **SETTINGS), save=tmp_path / "pruned", checkpointing=False)
    index = json.loads((tmp_path / "pruned" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]   # tied to the embeddings, stored once
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reloaded, _, _ = load_model(str(tmp_path / "pruned"))
    expected = dict(model.named_parameters(remove_duplicate=False))
    for name, parameter in reloaded.named_parameters(remove_duplicate=False):
        assert torch.equal(parameter, expected[name])
    masks = ckpt.load_masks(tmp_path / "pruned" / "masks.safetensors")
    weights = load_file(str(next((tmp_path / "pruned").glob("model-00002-*.safetensors"))))
    assert (weights["model.layers.0.mlp.down_proj.weight"][~masks["model.layers.0.mlp.down_proj"]] == 0).all()


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_streaming_perplexity_equals_the_whole_model_forward(family, tmp_path):
    from sparseswaps.data import evaluation_windows
    from sparseswaps.evaluate import perplexity, streaming_perplexities

    path = save_sharded(tmp_path / family, family)
    bos = family == "gemma3"
    streamed = streaming_perplexities(open_model(str(path)), ("wikitext2", "c4"), 48, "cpu", bos_per_window=bos,
                                      max_windows=3)
    model, tokenizer, _ = load_model(str(path))
    for corpus in ("wikitext2", "c4"):
        windows = evaluation_windows(corpus, tokenizer, 48, bos_per_window=bos, max_windows=3)
        assert streamed[corpus] == perplexity(model, windows, "cpu")


def test_the_warm_start_baseline_is_the_warm_start_run_alone(sharded, tmp_path):
    with_baseline = prune_model(PruneConfig(model=str(sharded), **SETTINGS), checkpointing=False)
    alone = prune_model(PruneConfig(model=str(sharded), solver="wanda", warm_start=None, **SETTINGS),
                        checkpointing=False)
    assert with_baseline["perplexity"]["warm_start"] == alone["perplexity"]["pruned"]
    assert with_baseline["perplexity"]["dense"] == alone["perplexity"]["dense"]
    assert "warm_start" not in alone["perplexity"]   # nothing to compare a warm-start-less run with


def test_protocols_set_the_swap_options_and_the_baseline():
    quick = PruneConfig().resolved()
    assert quick.warm_start_baseline and quick.solver_options == {"max_iters": 100, "swaps_per_scan": 16}
    paper = PruneConfig(protocol="paper").resolved()
    assert not paper.warm_start_baseline and paper.solver_options == {"max_iters": 100}
    assert PruneConfig(pattern="2:4").resolved().solver_options == {"max_iters": 100}
    mine = PruneConfig(solver_options={"swaps_per_scan": 1}, warm_start_baseline=False).resolved()
    assert mine.solver_options == {"max_iters": 100, "swaps_per_scan": 1} and not mine.warm_start_baseline
