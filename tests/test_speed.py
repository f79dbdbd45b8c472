"""`sparseswaps speed`: the N:M check and its errors (the measurement itself is in test_gpu.py)."""
import pytest
import torch

from sparseswaps import NM, cli, mask_from_scores
from sparseswaps.errors import UserError
from sparseswaps.speed import block_linears, check_nm, nm_violation
from tiny_models import save_tiny, tiny_model


def two_four(weight):
    return weight * mask_from_scores(weight.abs(), NM(2, 4))


def test_a_two_four_weight_passes_and_the_first_crowded_group_is_named():
    weight = two_four(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)))
    assert nm_violation(weight, 2, 4) is None
    weight[3, 9] = weight[3, 8:12].abs().max() + 1      # a third nonzero in row 3, inputs 8-11
    weight[3, 8:12][weight[3, 8:12] == 0] = 0.5
    assert nm_violation(weight, 2, 4).startswith("row 3, inputs 8-11 hold")
    assert "not a multiple of 4" in nm_violation(torch.zeros(2, 6), 2, 4)


def test_a_dense_model_is_refused_naming_its_first_layer():
    layers = block_linears(tiny_model("llama"))
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj is not 2:4 sparse: row 0"):
        check_nm(layers)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(two_four(layer.weight))
    check_nm(layers)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_speed_without_a_gpu_says_that_it_needs_one(tmp_path, capsys):
    path = save_tiny(tmp_path / "tiny", "llama")
    assert cli.main(["speed", "--model", str(path)]) == 2
    assert "needs a CUDA GPU with sparse tensor cores" in capsys.readouterr().err
