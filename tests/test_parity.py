"""Parity with the reference implementations, on small real and synthetic layers."""
from pathlib import Path

import pytest
import torch

from sparseswaps import NM, PerRow
from sparseswaps.instances import load_instances
from sparseswaps.solvers.sparsegpt import sparsegpt

INSTANCES = Path(__file__).resolve().parents[1] / "benchmarks" / "instances" / "smollm2"


def reference_fasterprune(weight, hessian, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
    """IST-DASLab/sparsegpt sparsegpt.py, SparseGPT.fasterprune, line for line without quantisation and
    logging (W is nn.Linear's [out, in], H the layer's Gram). Returns (pruned entries, new weights)."""
    W = weight.clone().float()
    columns = W.shape[1]
    H = hessian.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return pruned, W


def layer(source):
    """(weight, Gram): the real 64-wide SmolLM2 layer, or a correlated synthetic one 320 wide."""
    if source == "real":
        instance = next(i for i in load_instances(INSTANCES) if i.d == 64)
        return instance.weight.float(), instance.gram.float()
    from conftest import make_problem
    problem, _ = make_problem("correlated", rows=24, d=320, seed=5, tokens=1280, sparsity=0.5)
    return problem.weight.float(), problem.gram.float()


@pytest.mark.parametrize("source, blocksize", [("real", 16), ("real", 128), ("synthetic", 128)])
@pytest.mark.parametrize("pattern", ["50%", "60%", "2:4", "1:4"])
def test_sparsegpt_is_the_reference_fasterprune(source, blocksize, pattern):
    weight, gram = layer(source)
    d = weight.shape[1]
    if pattern.endswith("%"):
        sparsity = int(pattern[:-1]) / 100
        ours = sparsegpt(weight, gram, PerRow(d - int(d * sparsity)), blocksize=blocksize, row_equal=False,
                         sparsity=sparsity)
        reference = reference_fasterprune(weight, gram, sparsity, blocksize=blocksize)
    else:
        n, m = map(int, pattern.split(":"))
        ours = sparsegpt(weight, gram, NM(n, m), blocksize=blocksize)
        reference = reference_fasterprune(weight, gram, 0, prunen=m - n, prunem=m, blocksize=blocksize)
    assert torch.equal(ours[0], reference[0])
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-5, atol=1e-6 * reference[1].abs().max().item())


def reference_get_c4_windows(texts, nsamples, seed, seqlen, tokenizer):
    """locuslab/wanda lib/data.py get_c4, the training half, line for line on a list of texts."""
    import random

    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            trainenc = tokenizer(texts[i], return_tensors='pt')
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return torch.cat(trainloader)


@pytest.mark.parametrize("nsamples, seqlen, seed", [(6, 128, 0), (4, 256, 3)])
def test_calibration_windows_are_wandas_c4_sampler(nsamples, seqlen, seed):
    from sparseswaps.data import _rows, calibration_windows
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ours = calibration_windows(tokenizer, nsamples, seqlen, seed).input_ids
    assert torch.equal(ours, reference_get_c4_windows(_rows("c4-train"), nsamples, seed, seqlen, tokenizer))


def reference_ria_prune(W, scaler_row, sparsity_ratio=0.5, prune_n=0, prune_m=0, a=0.5):
    """biomedical-cybernetics/Relative-importance-and-activation-pruning lib/prune.py, prune_ria: the metric
    and the per-output-neuron unstructured branch or the direct N:M branch (no channel reallocation).
    Returns the pruned entries."""
    W_metric = (torch.abs(W) / torch.sum(torch.abs(W), dim=0) + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)) \
        * (torch.sqrt(scaler_row.reshape((1, -1)))) ** a
    W_mask = (torch.zeros_like(W_metric) == 1)
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, :int(W_metric.shape[1] * sparsity_ratio)]
        W_mask.scatter_(1, indices, True)
    return W_mask


@pytest.mark.parametrize("source", ["real", "synthetic"])
@pytest.mark.parametrize("pattern", ["50%", "70%", "2:4"])
def test_ria_is_the_reference_metric_and_selection(source, pattern):
    import sparseswaps as ss

    weight, gram = layer(source)
    scaler_row = gram.diagonal()      # the reference's ||X_j||² / nsamples up to the constant 1 / nsamples
    if pattern.endswith("%"):
        sparsity = int(pattern[:-1]) / 100
        problem = ss.MaskProblem(weight, gram, sparsity=sparsity, check_psd=False)
        reference = reference_ria_prune(weight, scaler_row, sparsity)
    else:
        problem = ss.MaskProblem(weight, gram, pattern=pattern, check_psd=False)
        reference = reference_ria_prune(weight, scaler_row, prune_n=2, prune_m=4)
    assert torch.equal(~ss.solve(problem, "ria").mask, reference)
