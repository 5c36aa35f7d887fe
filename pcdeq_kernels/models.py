"""The paper's networks (Gabor, Piotrowski, Cavalcante, ICML 2024), with the official code's widths.

pcDEQ-1 vs pcDEQ-2 follows from the activation: sigmoid gives pcDEQ-2 (relu injection), the others
pcDEQ-1 (softplus(beta=5) injection). Every pcDEQ layer starts from the paper's init and is kept
nonnegative by ``project_(model)`` after each optimizer step.

    LinearPCDEQNet      flatten -> Linear(in, d) -> BN -> pcDEQ(d) -> BN -> Linear(d, classes)
    SingleConvPCDEQNet  conv3x3(in, C) -> BN -> pcDEQconv(C) -> maxpool(3, 1, 1) -> BN -> avgpool(8)
                        -> flatten -> Linear(C * (size // 8)^2, classes)
    MultiConvPCDEQNet   three stages of [pcDEQconv(C_i) -> maxpool(3, 1, 1) -> BN], the first after
                        conv3x3(in, C_1) -> BN, the others after an unpadded stride-2 conv3x3 -> BN;
                        then avgpool(4) -> flatten -> Linear(C_3 * s^2, classes)

``paper_model(name, dataset, activation)`` builds them with the widths of the official code:
linear 80 (MNIST); single-conv 82 (MNIST), 125 (CIFAR-10, SVHN); multi-conv (12, 24, 48) (MNIST),
(20, 50, 80) (CIFAR-10, SVHN), (100, 120, 140) (CIFAR-10 with augmentation).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .modules import PCDEQConv2d, PCDEQLinear, pcdeq_layers, project_

# name -> (in_channels, image_size) and the widths of the official code
DATASETS = {"mnist": (1, 28), "cifar10": (3, 32), "cifar10_aug": (3, 32), "svhn": (3, 32)}
PAPER_WIDTHS = {
    "linear": {"mnist": 80},
    "single_conv": {"mnist": 82, "cifar10": 125, "svhn": 125},
    "multi_conv": {"mnist": (12, 24, 48), "cifar10": (20, 50, 80), "svhn": (20, 50, 80), "cifar10_aug": (100, 120, 140)},
}


class _PCDEQNet(nn.Module):
    def project_(self) -> None:
        """Restore ``W >= 0`` in every pcDEQ layer (call after each optimizer step)."""
        project_(self)

    def clamp(self) -> None:
        """``project_()`` under the official code's name (its training loop calls ``model.clamp()``)."""
        project_(self)

    def pcdeq_layers(self) -> list[nn.Module]:
        return list(pcdeq_layers(self))

    @property
    def blocks(self) -> list[nn.Module]:
        """The pcDEQ layers, as the official networks' ``blocks`` list (found afresh on each access, so a
        layer swapped in is the one ``clamp()`` projects)."""
        return self.pcdeq_layers()


class LinearPCDEQNet(_PCDEQNet):
    def __init__(self, in_features: int, features: int = 80, activation: str = "tanh", num_classes: int = 10, **layer_options: Any):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, features),
            nn.BatchNorm1d(features),
            PCDEQLinear(features, activation, **layer_options),
            nn.BatchNorm1d(features),
        )
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


def _conv_bn(in_channels: int, out_channels: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding), nn.BatchNorm2d(out_channels)]


def _pcdeq_stage(channels: int, activation: str, layer_options: dict) -> list[nn.Module]:
    return [PCDEQConv2d(channels, activation, **layer_options), nn.MaxPool2d(3, stride=1, padding=1), nn.BatchNorm2d(channels)]


class SingleConvPCDEQNet(_PCDEQNet):
    def __init__(self, in_channels: int, image_size: int, channels: int, activation: str = "tanh", num_classes: int = 10, **layer_options: Any):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"SingleConvPCDEQNet pools by 8, so images must be at least 8x8; got {image_size}")
        self.body = nn.Sequential(
            *_conv_bn(in_channels, channels, stride=1, padding=1),
            *_pcdeq_stage(channels, activation, layer_options),
            nn.AvgPool2d(8),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(channels * (image_size // 8) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


class MultiConvPCDEQNet(_PCDEQNet):
    def __init__(self, in_channels: int, image_size: int, widths: tuple[int, int, int], activation: str = "tanh", num_classes: int = 10, **layer_options: Any):
        super().__init__()
        c1, c2, c3 = widths
        size = image_size
        for _ in range(2):  # unpadded stride-2 3x3 convs
            size = (size - 3) // 2 + 1
        if size < 4:
            raise ValueError(f"MultiConvPCDEQNet needs images of at least 19x19 (final avgpool(4)); got {image_size}")
        self.body = nn.Sequential(
            *_conv_bn(in_channels, c1, stride=1, padding=1),
            *_pcdeq_stage(c1, activation, layer_options),
            *_conv_bn(c1, c2, stride=2, padding=0),
            *_pcdeq_stage(c2, activation, layer_options),
            *_conv_bn(c2, c3, stride=2, padding=0),
            *_pcdeq_stage(c3, activation, layer_options),
            nn.AvgPool2d(4),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c3 * (size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


def paper_model(name: str, dataset: str, activation: str = "tanh", **layer_options: Any) -> _PCDEQNet:
    """The paper's network ``name`` ("linear", "single_conv", "multi_conv") for ``dataset``
    ("mnist", "cifar10", "cifar10_aug", "svhn") with the official widths."""
    if name not in PAPER_WIDTHS:
        raise ValueError(f"unknown network {name!r}: choose one of {sorted(PAPER_WIDTHS)}")
    if dataset not in PAPER_WIDTHS[name]:
        raise ValueError(f"the paper has no {name} network for {dataset!r}; it has {sorted(PAPER_WIDTHS[name])}")
    in_channels, size = DATASETS[dataset]
    width = PAPER_WIDTHS[name][dataset]
    if name == "linear":
        return LinearPCDEQNet(in_channels * size * size, width, activation, **layer_options)
    if name == "single_conv":
        return SingleConvPCDEQNet(in_channels, size, width, activation, **layer_options)
    return MultiConvPCDEQNet(in_channels, size, width, activation, **layer_options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (at the end: migration reads the network classes above)
from .migration import load_official_state_dict, official_optimizer_state  # noqa: E402,F401
