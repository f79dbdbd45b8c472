"""torchrun with gloo ranks on CPU: the same masks, weights and perplexities as one process, and a failing rank
stops the others."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sparseswaps import cli
from sparseswaps.distributed import SINGLE, Ranks, check_shards, shard_bounds
from sparseswaps.errors import UserError
from sparseswaps.pipeline import PruneConfig, prune_model
from test_pipeline import assert_same_folders
from test_streaming import save_sharded

SHAPE = ["--nsamples", "4", "--seqlen", "64", "--eval-windows", "5", "--sparsity", "0.6"]
# gloo ranks share the CPU even where a GPU is visible (one GPU cannot lend two ranks a device each)
ARGS = [*SHAPE, "--device", "cpu"]


def torchrun(ranks: int, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "sparseswaps", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_sharded(tmp_path_factory.mktemp("distributed") / "llama")


@pytest.mark.parametrize("ranks", [2, 1])
def test_gloo_ranks_give_what_one_process_gives(model, tmp_path, ranks):
    single = tmp_path / "single"
    assert cli.main(["prune", "--model", str(model), *ARGS, "--shards", str(ranks), "--out", str(single / "r.json"),
                     "--save", str(single / "model")]) == 0
    ranked = tmp_path / "ranked"
    run = torchrun(ranks, "prune", "--model", str(model), *ARGS, "--out", str(ranked / "r.json"),
                   "--save", str(ranked / "model"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_folders(single / "model", ranked / "model")
    one, two = (json.loads((folder / "r.json").read_text()) for folder in (single, ranked))
    assert one["perplexity"] == two["perplexity"]
    assert [row["objective"] for row in one["layers"]] == [row["objective"] for row in two["layers"]]
    assert one["config"]["shards"] == two["config"]["shards"] == ranks and two["ranks"] == ranks
    assert not (ranked / "r.json.checkpoint").exists()


def test_two_ranks_resume_what_one_process_left(model, tmp_path):
    config = PruneConfig(model=str(model), nsamples=4, seqlen=64, eval_windows=5, sparsity=0.6, shards=2,
                          device="cpu")
    reference = prune_model(config, checkpointing=False)
    with pytest.raises(KeyboardInterrupt):
        prune_model(config, tmp_path / "r.json", stop_after_block=0)
    run = torchrun(2, "prune", "--model", str(model), *ARGS, "--out", str(tmp_path / "r.json"), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = json.loads((tmp_path / "r.json").read_text())
    assert resumed["perplexity"] == reference["perplexity"]
    assert [row["objective"] for row in resumed["layers"]] == [row["objective"] for row in reference["layers"]]


FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import sparseswaps.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("rank 1 broke while pruning")

    pipeline._prune_block = broken
"""


def test_a_failing_rank_stops_every_rank_with_its_error(model, tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    started = time.monotonic()
    run = torchrun(2, "prune", "--model", str(model), *ARGS, "--out", str(tmp_path / "r.json"),
                   env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])},
                   timeout=300)
    assert run.returncode != 0
    assert "rank 1 broke while pruning" in run.stderr
    assert time.monotonic() - started < 300 and not (tmp_path / "r.json").exists()


def test_shards_must_be_a_multiple_of_the_ranks():
    with pytest.raises(UserError, match="not a multiple of the 2 ranks"):
        check_shards(3, Ranks(0, 2), 8)
    with pytest.raises(UserError, match="exceeds the 4 calibration windows"):
        check_shards(8, SINGLE, 4)
    check_shards(4, Ranks(1, 2), 4)


def test_shards_are_contiguous_and_cover_everything():
    bounds = shard_bounds(10, 4)
    assert [len(b) for b in bounds] == [3, 3, 2, 2] and [i for b in bounds for i in b] == list(range(10))
    assert list(Ranks(1, 2).own_shards(4)) == [2, 3]


def test_one_process_folds_in_list_order():
    parts = [torch.tensor([1e16]), torch.tensor([1.0]), torch.tensor([-1e16])]
    assert SINGLE.fold_in_order(parts).item() == (1e16 + 1.0) - 1e16
    assert SINGLE.gather_rows(parts[1], [1]) is parts[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_nccl_rank_gives_what_one_process_gives(model, tmp_path):
    """One GPU lends one NCCL rank: every collective then runs on CUDA tensors, with one process's result."""
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    assert cli.main(["prune", "--model", str(model), *SHAPE, "--device", "cuda", "--out", str(single / "r.json"),
                     "--save", str(single / "model")]) == 0
    run = torchrun(1, "prune", "--model", str(model), *SHAPE, "--device", "cuda", "--out", str(ranked / "r.json"),
                   "--save", str(ranked / "model"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_folders(single / "model", ranked / "model")
    one, two = (json.loads((folder / "r.json").read_text()) for folder in (single, ranked))
    assert one["perplexity"] == two["perplexity"] and two["ranks"] == 1
