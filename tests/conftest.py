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
