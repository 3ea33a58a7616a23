"""TempBalance with the reference's grouping (``groups="reference"``), against a float64 port
of YefanZhou/TempBalance ``tempbalance.py`` (Tempbalance.build_optimizer_param_group with
pl_fitting="median", xmin_pos=2, conv_norm=0.5, batchnorm_type="name", tb_linear_map),
written from the reference code and sharing no code with tailwise."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from steps.core.training import TempBalance

torch.set_num_threads(1)


class BasicBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width))


class SmallResNet(nn.Module):
    """conv1/bn1 pairs named as the reference expects, a shortcut BatchNorm that no conv name
    matches, a LayerNorm and an Embedding (neither is in the reference's layer list)."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width), BasicBlock(width))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 64)
        self.linear = nn.Linear(64, 10)
        # Large weights: no eigenvalue near 1e-5, where tailwise's hill fit still drops
        # eigenvalues and the reference's does not (faithful-defaults work, issue 14).
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.normal_(module.weight, std=100.0)


def reference_lrs(net: nn.Module, lr: float) -> dict[int, float]:
    """lr per parameter id, as the reference's build_optimizer_param_group assigns it."""
    names, alphas, smallest = [], [], []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            matrix = m.weight.detach().to(torch.float64).clone()
            if isinstance(m, nn.Conv2d):
                matrix = torch.flatten(matrix, start_dim=2) * math.sqrt(0.5)
                matrix = matrix.transpose(1, 2).transpose(0, 1)
            eigs = torch.sort(torch.square(torch.linalg.svdvals(matrix).flatten())).values
            smallest.append(float(eigs[0]))
            i = int(len(eigs) / 2)
            n = float(len(eigs) - i)
            logs = torch.log(eigs)
            alphas.append(float(1 + n / (torch.sum(logs[i:]) - n * logs[i])))
            names.append(name)
    assert min(smallest) > 1e-4  # see SmallResNet
    names, alphas = names[1:-1], np.array(alphas[1:-1])  # first and last layers removed
    scheduled = dict(zip(names, np.interp(alphas, [alphas.min(), alphas.max()],
                                          [0.5 * lr, 1.5 * lr]), strict=True))
    conv_names = {name for name, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    bn_to_conv = {name: name.replace("bn", "conv") for name, m in net.named_modules()
                  if isinstance(m, nn.BatchNorm2d) and name.replace("bn", "conv") in conv_names}
    lrs = {}
    for name, module in net.named_modules():
        if name in scheduled:
            lrs |= {id(p): scheduled[name] for p in module.parameters()}
        elif isinstance(module, nn.BatchNorm2d) and bn_to_conv.get(name) in scheduled:
            lrs |= {id(p): scheduled[bn_to_conv[name]] for p in module.parameters()}
    return {id(p): lrs.get(id(p), lr) for p in net.parameters()}


def test_reference_grouping_gives_the_reference_lrs():
    model = SmallResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tb = TempBalance(model, optimizer, groups="reference", min_evals=0)
    tb.step()
    ours = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = reference_lrs(model, 0.1)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert abs(ours[key] - value) <= 1e-9 * value
    # The shortcut's BatchNorm, the LayerNorm and the Embedding keep the global lr; the
    # blocks' bn1 / bn2 follow conv1 / conv2.
    by_param = {id(p): name for name, p in model.named_parameters()}
    untouched = {by_param[k] for k, v in ours.items() if v == 0.1}
    assert {"norm.weight", "embed.weight", "layer1.0.shortcut.1.weight"} <= untouched
    assert ours[id(model.layer1[0].bn1.weight)] == ours[id(model.layer1[0].conv1.weight)]
    assert len({round(v, 12) for v in ours.values()}) > 3


def test_default_grouping_lets_norms_follow_their_layer():
    model = SmallResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tb = TempBalance(model, optimizer, min_evals=0)
    tb.step()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lr_of[id(model.norm.weight)] == lr_of[id(model.layer1[1].shortcut[0].weight)]
    other = SmallResNet()
    reference = TempBalance(other, torch.optim.SGD(other.parameters(), lr=0.1),
                            groups="reference")
    assert tb.layers[0] == "embed" and reference.layers[0] == "conv1"
    assert "norm" not in {g["name"] for g in optimizer.param_groups}
