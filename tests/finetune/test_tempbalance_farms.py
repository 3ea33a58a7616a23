"""TempBalance on FARMS alphas (``farms=``) against a float64 port of the FARMS reference's
image-classification code (HUST-AI-HYZ/FARMS ``Image_Classification``: ``sampling.
fixed_sampling``, the Conv2d branch of ``Tempbalance_FARMS.net_esd_estimator`` with
``use_sliding_window`` and ``analysis_esd`` with pl_fitting 'median', xmin_pos 2), written from
the reference code and sharing no code with tailwise; training with it; the finetune step's
``tb_farms``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from steps.core.factory import build_model, byte_tokenizer, save_hf
from steps.core.farms import IMAGE_CLASSIFICATION_OPTIONS, FarmsOptions, farms_spectra
from steps.core.step import run_step
from steps.core.store import open_store
from steps.core.training.tempbalance import TempBalance, TempBalanceError, layer_param_groups
from steps.core.weights import open_weights
from steps.finetune.hf import FinetuneConfig, balance_view, finetune, load_classifier
from steps.finetune.step import STEP

torch.set_num_threads(1)

# --- the reference, ported (float64) ------------------------------------------------------


def median_alpha(eigs: torch.Tensor, xmin_pos: float = 2) -> float:
    """analysis_esd, fix_fingers 'median', filter_zeros False: xmin at len / xmin_pos."""
    nz_eigs = torch.sort(eigs).values
    i = int(len(nz_eigs) / xmin_pos)
    n = float(len(nz_eigs) - i)
    log_nz_eigs = torch.log(nz_eigs)
    return float(1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i]))


def fixed_sampling(matrix: torch.Tensor, num_row_samples: int, q_ratio: float,
                   sampling_ops_per_dim: int) -> torch.Tensor:
    """sampling.fixed_sampling (a Linear weight; the image-classification copy, uncapped)."""
    rows, cols = matrix.shape
    num_col_samples = int(num_row_samples * q_ratio)
    row_step = max(1, (rows - num_row_samples) // (sampling_ops_per_dim - 1))
    col_step = max(1, (cols - num_col_samples) // (sampling_ops_per_dim - 1))
    num_row_windows = min(sampling_ops_per_dim, max(1, (rows - num_row_samples) // row_step + 1))
    num_col_windows = min(sampling_ops_per_dim, max(1, (cols - num_col_samples) // col_step + 1))
    all_eigs = []
    for i in range(num_row_windows):
        for j in range(num_col_windows):
            row_start = min(i * row_step, rows - num_row_samples)
            col_start = min(j * col_step, cols - num_col_samples)
            submatrix = matrix[row_start:row_start + num_row_samples,
                               col_start:col_start + num_col_samples]
            all_eigs.append(torch.square(torch.linalg.svdvals(submatrix)))
    return torch.sort(torch.cat(all_eigs)).values


def conv_alpha(weight: torch.Tensor, q_ratio: float, conv_norm: float = 0.5) -> float:
    """The Conv2d branch: conv2D_Wmats slices (channels last, rows >= cols), one ESD per row
    band d (windows W[d*nr:(d+1)*nr, :nc] of every slice, scaled by sqrt(conv_norm)), mean
    of the bands' alphas."""
    out_channels, in_channels, imax, jmax = weight.shape
    assert out_channels + in_channels >= imax + jmax  # conv2D_Wmats' channels-last branch
    wmats = []
    for i in range(imax):
        for j in range(jmax):
            w = weight[:, :, i, j]
            wmats.append(w.T if w.shape[0] < w.shape[1] else w)
    rows, cols = wmats[0].shape
    if q_ratio > 1:
        num_row_samples, num_col_samples = cols // q_ratio, cols
    else:
        num_row_samples, num_col_samples = cols, cols // (1 / q_ratio)
    num_row_samples, num_col_samples = max(1, int(num_row_samples)), max(1, int(num_col_samples))
    alphas = []
    for i in range(int(rows // cols)):
        division_eigs = [torch.square(torch.linalg.svdvals(
            w[i * num_row_samples:(i + 1) * num_row_samples, :num_col_samples]
            * math.sqrt(conv_norm))) for w in wmats]
        alphas.append(median_alpha(torch.cat(division_eigs)))
    return float(np.mean(alphas))


def reference_alphas(net: nn.Module, names: list[str], num_row_samples: int, q_ratio: float,
                     ops: int) -> dict[str, float]:
    """net_esd_estimator(use_sliding_window=True): alpha of these Linear / Conv2d modules."""
    out = {}
    for name, m in net.named_modules():
        weight = getattr(m, "weight", None)
        if name not in names:
            continue
        if isinstance(m, nn.Conv2d):
            out[name] = conv_alpha(weight.detach().to(torch.float64), q_ratio)
        elif isinstance(m, nn.Linear):
            assert min(weight.shape) >= num_row_samples  # the reference slices from < 0 else
            eigs = fixed_sampling(weight.detach().to(torch.float64), num_row_samples, q_ratio,
                                  ops)
            out[name] = median_alpha(eigs)
    return out


# --- models -------------------------------------------------------------------------------


def heavy_mlp(seed: int = 0) -> nn.Sequential:
    """Non-square Linear layers (out x in: 160x64, 240x160, 120x240, 200x120, 10x200) with
    Student-t entries of different tails, so that the balanced layers' alphas differ."""
    rng = np.random.default_rng(seed)
    sizes = [64, 160, 240, 120, 200, 10]
    layers: list[nn.Module] = []
    for n_in, n_out, nu in zip(sizes[:-1], sizes[1:], [30.0, 2.5, 6.0, 3.5, 30.0], strict=True):
        linear = nn.Linear(n_in, n_out)
        linear.weight.data = torch.tensor(rng.standard_t(nu, size=(n_out, n_in)) * 0.05,
                                          dtype=torch.float32)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn() -> nn.Module:
    """The factory CNN, wide enough that its Linear layers hold the 100-row windows."""
    return build_model("cnn", seed=0, width=32)  # conv 64x32x3x3, Linear 128 x 1024


OPTIONS = [IMAGE_CLASSIFICATION_OPTIONS, FarmsOptions(window=48, q=0.5, ops=4),
           FarmsOptions(window=40, q=1.5, ops=3)]


@pytest.mark.parametrize("options", OPTIONS, ids=["image-cls", "q0.5", "q1.5"])
@pytest.mark.parametrize("make", [heavy_mlp, cnn], ids=["mlp", "cnn"])
def test_alphas_equal_the_reference_port(make, options):
    model = make()
    optimizer = torch.optim.SGD(layer_param_groups(model, 0.1), lr=0.1)
    tb = TempBalance(model, optimizer, farms=options, min_evals=0)
    tb.step()
    balanced = [n for n, keep in zip(tb.layers, tb.included, strict=True) if keep]
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert balanced == layers[1:-1]  # the reference's remove_first / remove_last_layer
    expected = reference_alphas(model, balanced, options.window, options.q, options.ops)
    for name in balanced:
        assert tb.history[-1].alphas[name] == pytest.approx(expected[name], rel=1e-6), name
    assert len({round(tb.history[-1].alphas[n], 6) for n in balanced}) == len(balanced)


def test_farms_none_is_the_whole_matrix_alpha():
    model = heavy_mlp()
    farms_tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           farms=IMAGE_CLASSIFICATION_OPTIONS)
    plain_tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1))
    farms_tb.step()
    plain_tb.step()
    farms, plain = farms_tb.history[-1].alphas, plain_tb.history[-1].alphas
    assert all(abs(farms[n] - plain[n]) > 1e-3 for n in ("2", "4", "6"))


def test_training_with_farms_factors_follow_the_alphas():
    model = heavy_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    tb = TempBalance(model, optimizer, scheduler=scheduler, farms=IMAGE_CLASSIFICATION_OPTIONS,
                     lr_range=(0.1, 1.9))  # the FARMS runs' range for ResNet-18
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    tb.step()
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        tb.step()
    assert len(tb.history) == 3
    assert tb.history[0].alphas != tb.history[-1].alphas  # recomputed on the trained weights
    record, balanced = tb.history[-1], ["2", "4", "6"]
    expected = reference_alphas(model, balanced, 100, 1.0, 9)
    assert [record.alphas[n] for n in balanced] == pytest.approx(
        [expected[n] for n in balanced], rel=1e-6)
    alphas = np.array([record.alphas[n] for n in balanced])
    expected = np.interp(alphas, [alphas.min(), alphas.max()], [0.1, 1.9])
    assert [record.factors[n] for n in balanced] == pytest.approx(expected, rel=1e-12)
    assert record.factors["0"] == record.factors["8"] == 1.0  # first / last layer
    eta = scheduler.get_last_lr()[0]
    for name, lr in tb.lrs().items():
        assert lr == pytest.approx(eta * record.factors[name], rel=1e-12)


def test_non_finite_weights_keep_nan_and_factor_one():
    model = heavy_mlp()
    model[4].weight.data[0, 0] = float("nan")
    tb = TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     farms=IMAGE_CLASSIFICATION_OPTIONS)
    tb.step()
    assert math.isnan(tb.history[-1].alphas["4"]) and tb.factors["4"] == 1.0
    assert sorted(tb.factors[n] for n in ("2", "6")) == [0.5, 1.5]


def test_bad_farms_options():
    model = heavy_mlp()
    with pytest.raises(TempBalanceError, match="ops 1 must be >= 2"):
        TempBalance(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    farms=FarmsOptions(window=100, q=1.0, ops=1))


def test_finetune_step_tb_farms(tmp_path):
    store = open_store(str(tmp_path / "store"))
    model = store.put(save_hf(cnn(), None, tmp_path / "cnn"), "model").digest
    params = {"dataset": "digits", "fraction": 0.25, "epochs": 1, "batch_size": 32, "lr": 0.05,
              "optimizer": "sgd", "tempbalance": "linear", "device": "cpu"}
    metrics = {}
    for farms in (False, True):
        result = run_step(STEP, params | {"tb_farms": farms}, {"model": model}, store=store)
        path = store.get(result.digests()["metrics"], tmp_path / f"metrics-{farms}.json")
        metrics[farms] = path.read_text()
    assert metrics[True] != metrics[False]  # other alphas, other learning rates


def test_hf_finetune_tb_farms_records_farms_alphas(tmp_path):
    model_dir = save_hf(build_model("tiny-llama", seed=0), byte_tokenizer(), tmp_path / "llama")
    model, tokenizer, _ = load_classifier(model_dir, ["animals", "numbers"], seed=0)
    config = FinetuneConfig(epochs=1, batch_size=8, lr=3e-3, max_length=16,
                            tempbalance="linear", tb_farms=True)
    view, groups = balance_view(model, config.lr)
    texts = [f"the sum of {i} and {i}" if i % 2 else f"a cat and {i} dogs" for i in range(16)]
    result = finetune(model, tokenizer, view, groups, (texts, np.arange(16) % 2), None, config)
    alphas = result.records[-1].alphas
    source = open_weights(view)
    measured = [info for info in source.infos() if np.isfinite(alphas.get(info.name, np.nan))]
    assert len(measured) == 2 * 7  # every balanced block layer
    for info in measured:
        spectra = farms_spectra(source.load(info), info.layer_type, IMAGE_CLASSIFICATION_OPTIONS)
        assert alphas[info.name] == pytest.approx(spectra.alpha("hill", 2.0), rel=1e-12)
