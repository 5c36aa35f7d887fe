"""The official pcDEQ networks (the authors' networks.py, blocks.py, layers.py), restated for the
migration tests: the same module names, registration order and weight-norm parameters (so the same
state-dict keys and parameter order), with the DEQ solved by the official algorithm as this library
restates it (pcdeq_kernels.official). Written from the description of those files, not copied."""

import torch
import torch.nn.functional as F
from torch import nn

from pcdeq_kernels.official import official_fixed_point
from pcdeq_kernels.parametrizations import paper_init

INJECTIONS = {"tanh": lambda x: F.softplus(x, beta=5), "sigmoid": F.relu}


class WeightNormed(nn.Module):
    """What ``weight_norm(nn.Linear / nn.Conv2d(bias=False))`` leaves: ``weight_g`` then ``weight_v``."""

    def __init__(self, shape):
        super().__init__()
        v = paper_init(shape)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, *([1] * (len(shape) - 1))))
        self.weight_v = nn.Parameter(v)

    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.flatten(1).norm(dim=1).view_as(self.weight_g)


class Map(nn.Module):  # the official "f": act(W(z) + x), its weight under the name W
    def __init__(self, shape):
        super().__init__()
        self.W = WeightNormed(shape)


class DEQ(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.f = Map(shape)
        self.iter_forward = self.iter_backward = 0


class Block(nn.Module):
    def __init__(self, shape, activation, tol, max_iter):
        super().__init__()
        self.deq = DEQ(shape)
        self.activation, self.tol, self.max_iter = activation, tol, max_iter

    def forward(self, x):
        u = INJECTIONS[self.activation](x)
        z, self.stats = official_fixed_point(u, self.deq.f.W.weight(), self.activation, self.tol, self.max_iter)
        self.deq.iter_forward = self.stats.forward_iterations  # (the backward's count: stats, after backward)
        return z

    def clamp(self):
        with torch.no_grad():
            self.deq.f.W.weight_v.clamp_(min=0)
            self.deq.f.W.weight_g.clamp_(min=0)


class Net(nn.Module):
    def clamp(self):
        for block in self.blocks:
            block.clamp()


class LinearNet(Net):  # LinearPcDEQ1/2(ch=80): MNIST's 784 inputs
    def __init__(self, activation, tol, max_iter, ch=80):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(784, ch)
        self.bn1 = nn.BatchNorm1d(ch)
        self.block = Block((ch, ch), activation, tol, max_iter)
        self.bn2 = nn.BatchNorm1d(ch)
        self.classifier = nn.Linear(ch, 10)
        self.blocks = [self.block]

    def forward(self, x):
        return self.classifier(self.bn2(self.block(self.bn1(self.linear1(self.flatten(x))))))


class SingleConvNet(Net):  # SingleConvPcDEQ1/2(28, 1, 82)
    def __init__(self, activation, tol, max_iter, in_dim=28, in_ch=1, ch=82):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.block = Block((ch, ch, 3, 3), activation, tol, max_iter)
        self.flatten = nn.Flatten()
        self.bn1 = nn.BatchNorm2d(ch)
        self.bn2 = nn.BatchNorm2d(ch)
        self.avg_pool = nn.AvgPool2d(8)
        self.classifier = nn.Linear(ch * (in_dim // 8) ** 2, 10)
        self.max_pool = nn.MaxPool2d(3, 1, 1)
        self.blocks = [self.block]

    def forward(self, x):
        x = self.bn2(self.max_pool(self.block(self.bn1(self.conv1(x)))))
        return self.classifier(self.flatten(self.avg_pool(x)))


class MultiConvNet(Net):  # MultiConvPcDEQ1/2(1, 12, 24, 48)
    def __init__(self, activation, tol, max_iter, in_ch=1, widths=(12, 24, 48)):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(in_ch, c1, 3, padding=1)
        self.block1 = Block((c1, c1, 3, 3), activation, tol, max_iter)
        self.downsample1 = nn.Conv2d(c1, c2, 3, stride=2)
        self.block2 = Block((c2, c2, 3, 3), activation, tol, max_iter)
        self.downsample2 = nn.Conv2d(c2, c3, 3, stride=2)
        self.block3 = Block((c3, c3, 3, 3), activation, tol, max_iter)
        self.avg_pool = nn.AvgPool2d(4)
        self.max_pool = nn.MaxPool2d(3, 1, 1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c3, 10)
        self.bn1, self.bn2 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c1)
        self.bn3, self.bn4 = nn.BatchNorm2d(c2), nn.BatchNorm2d(c2)
        self.bn5, self.bn6 = nn.BatchNorm2d(c3), nn.BatchNorm2d(c3)
        self.blocks = [self.block1, self.block2, self.block3]

    def forward(self, x):
        x = self.bn2(self.max_pool(self.block1(self.bn1(self.conv1(x)))))
        x = self.bn4(self.max_pool(self.block2(self.bn3(self.downsample1(x)))))
        x = self.bn6(self.max_pool(self.block3(self.bn5(self.downsample2(x)))))
        return self.classifier(self.flatten(self.avg_pool(x)))


NETWORKS = {"linear": LinearNet, "single_conv": SingleConvNet, "multi_conv": MultiConvNet}
