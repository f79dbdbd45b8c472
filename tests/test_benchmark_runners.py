"""The matrix runners' tables and plots, on the committed H100 results (they run where time is scarce)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run_pruning  # noqa: E402
import run_zeroshot  # noqa: E402


def test_pruning_table_and_plot(tmp_path):
    runs = json.loads((BENCHMARKS / "results" / "pruning_smollm2.json").read_text())["runs"]
    table = run_pruning.table(runs)
    for method in {run["method"] for run in runs}:
        assert f"| {method} |" in table
    assert "Notes:" in table   # the DSnoT runs carry a note
    weights = json.loads((BENCHMARKS / "results" / "pruning_smollm2_weights_h200.json").read_text())["runs"]
    assert "| wanda+swaps+refit | 40.57 | 49.70 |" in run_pruning.table(weights)
    run_pruning.plot(runs, tmp_path / "matrix.png")
    assert (tmp_path / "matrix.png").stat().st_size > 10_000


def test_zeroshot_plot(tmp_path):
    runs = json.loads((BENCHMARKS / "results" / "zeroshot_smollm2.json").read_text())["runs"]
    run_zeroshot.plot({name: run["zero_shot"] for name, run in runs.items()}, tmp_path / "zeroshot.png")
    assert (tmp_path / "zeroshot.png").stat().st_size > 10_000


def test_pruning_shards_merge_into_one_matrix(tmp_path, monkeypatch):
    runs = json.loads((BENCHMARKS / "results" / "pruning_smollm2.json").read_text())["runs"]
    shards = [tmp_path / "a.json", tmp_path / "b.json"]
    shards[0].write_text(json.dumps({"runs": runs[::2]}))
    shards[1].write_text(json.dumps({"runs": runs[1::2]}))
    out = tmp_path / "matrix.json"
    out.write_text(json.dumps({"runs": [dict(runs[0], note="stale")]}))   # replaced by shard a's run
    monkeypatch.setattr(sys, "argv", ["run_pruning.py", "--out", str(out), "--merge", *map(str, shards)])
    run_pruning.main()
    merged = json.loads(out.read_text())["runs"]
    assert sorted((r["method"], r["target"]) for r in merged) == sorted((r["method"], r["target"]) for r in runs)
    assert merged == runs[::2] + runs[1::2]
    assert out.with_suffix(".md").read_text() == run_pruning.table(merged)


def test_every_method_is_a_valid_pipeline_configuration():
    """Each method of the matrices resolves to a chain the pipeline accepts (solver names, warm start)."""
    for method, chosen in run_pruning.METHODS.items():
        for target in ("0.5", "2:4"):
            config = run_pruning.method_config(method, target, device="cpu").resolved()
            assert (config.solver, config.warm_start, config.update_weights) == (
                chosen.solver, chosen.warm, chosen.update_weights), method
            assert config.solver_options.items() >= chosen.options.items()


def test_a_stopped_pipeline_run_is_recorded_as_a_lower_bound(tmp_path):
    import bench_pipeline

    assert bench_pipeline.finished([sys.executable, "-c", "pass"], timeout=60)
    assert not bench_pipeline.finished([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    with pytest.raises(subprocess.CalledProcessError):
        bench_pipeline.finished([sys.executable, "-c", "raise SystemExit(3)"], timeout=60)
    args = type("Args", (), {"solver_option": ["max_iters=20"], "method_timeout": 600.0})()
    stopped = bench_pipeline.stopped_run("admm+refit_swaps_diag", args, blocks=1, ranks=0)
    assert stopped["config"]["solver_options"] == {"diagonal_damping": 0.1, "max_iters": 20}
    measured = json.loads((BENCHMARKS / "results" / "bench_pipeline_methods_8b_h200.json").read_text())["runs"]
    table = bench_pipeline.table(measured + [dict(stopped, model_shape="llama3-8b",
                                                  sizes=measured[0]["sizes"])])
    assert "| llama3-8b | 1 | admm+refit_swaps_diag (≤ 20 swaps/row) | process | > 600 (stopped) |" in table
    assert "stopped after 600 s" in table and "| alps | process | 54.7 |" in table
