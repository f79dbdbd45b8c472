import json

from sparseswaps import cli
from sparseswaps.gaps import proven_optima, read_jsonl


def test_gaps_harness_is_resumable_and_reports(tmp_path, capsys):
    instances, results = tmp_path / "inst", tmp_path / "res"
    assert cli.main(["extract", "--synthetic", "iid,outliers", "--widths", "8,12", "--rows", "2",
                     "--out", str(instances)]) == 0
    argv = ["gaps", "--instances", str(instances), "--solvers", "wanda,swaps,bruteforce,scip,highs:max_d=8",
            "--sparsity", "0.5,0.6", "--pattern", "1:4", "--time-limit", "30", "--out", str(results)]
    assert cli.main(argv) == 0
    records = read_jsonl(results / "gaps.jsonl")
    # 4 instances x 3 targets x 4 solvers, plus highs on the two d = 8 instances
    assert len(records) == 4 * 3 * 4 + 2 * 3
    assert all(v is not None for rows in proven_optima(records).values() for v in rows)
    assert cli.main(argv) == 0 and len(read_jsonl(results / "gaps.jsonl")) == len(records)   # nothing re-run
    report = (results / "gaps.md").read_text()
    assert "| swaps |" in report and "Largest d" in report
    assert (results / "exact_time_vs_d.png").is_file() and (results / "gap_vs_d_50pct.png").is_file()
    assert json.loads((instances / "optima.json").read_text())
    (results / "gaps.md").unlink()
    assert cli.main(["report", "--results", str(results)]) == 0 and (results / "gaps.md").read_text() == report


def test_real_instances_restrict_the_true_gram():
    import torch

    from sparseswaps.instances import layer_grams, real_instances
    from tiny_models import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    instances = real_instances(model, tokenizer, {"source": "tiny"}, [0, 1], ("q_proj", "down_proj"), [8, 16], 2,
                               seed=0, nsamples=2, seqlen=32)
    assert len(instances) == 2 * 2 * 2 and len({i.name for i in instances}) == len(instances)
    full, _ = layer_grams(model, tokenizer, ["model.layers.1.mlp.down_proj"], 2, 32, 0)
    inst = next(i for i in instances if i.meta["layer"] == "model.layers.1.mlp.down_proj" and i.d == 16)
    channels, rows = torch.tensor(inst.meta["channels"]), torch.tensor(inst.meta["output_rows"])
    torch.testing.assert_close(inst.gram, full["model.layers.1.mlp.down_proj"][channels][:, channels])
    weight = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"].double()
    torch.testing.assert_close(inst.weight, weight[rows][:, channels])
    assert inst.problem("50%").is_feasible(inst.problem("50%").project(torch.ones(2, 16, dtype=torch.bool)))


def test_a_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path):
    import json

    import pytest

    from sparseswaps.errors import UserError
    from sparseswaps.gaps import read_jsonl

    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"a": 2}) + "\n" + '{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}] and path.read_text().endswith('"b"')   # reading alone keeps it
    assert read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
    with open(path, "a") as handle:
        handle.write(json.dumps({"a": 4}) + "\n")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_jsonl(path)


def test_gaps_on_a_local_ray_record_what_the_process_pool_records(tmp_path):
    import pytest

    pytest.importorskip("ray")
    instances = tmp_path / "inst"
    assert cli.main(["extract", "--synthetic", "iid", "--widths", "12", "--rows", "3", "--out", str(instances)]) == 0
    runs = {}
    for executor in ("process", "ray"):
        out = tmp_path / executor
        assert cli.main(["gaps", "--instances", str(instances), "--solvers", "scip:workers=2,highs:workers=2",
                         "--sparsity", "0.6", "--pattern", "", "--time-limit", "30", "--executor", executor,
                         "--out", str(out)]) == 0
        runs[executor] = [(r["solver"], r["row_objective"], r["row_bound"], r["row_status"])
                          for r in read_jsonl(out / "gaps.jsonl")]
    assert runs["process"] == runs["ray"] and len(runs["ray"]) == 2
