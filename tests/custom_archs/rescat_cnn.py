"""A small CNN the zoo does not have: a residual block, a depthwise-separable branch
concatenated with a plain 3x3 branch, a grouped convolution (pruned with equal partitions), global
average pooling and a linear classifier. Used as an uploaded architecture in the tests and the
benchmark (`factory="rescat_cnn:build"`). `pool` > 1 max-pools after the stem, so that on 28x28
images (MNIST) the 3x3 layers see most of the digit and cost 1/pool^2 of the MACs."""

import torch
from torch import nn


class ResCatNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, pool: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(),
                                  *([nn.MaxPool2d(pool)] if pool > 1 else []))
        self.res_conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(width)
        self.res_relu1 = nn.ReLU()
        self.res_conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(width)
        self.res_relu2 = nn.ReLU()
        self.branch = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.relu_sep = nn.ReLU()
        self.mix = nn.Conv2d(2 * width, 2 * width, 1)
        self.relu_mix = nn.ReLU()
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4)
        self.relu_grouped = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        residual = self.res_bn2(self.res_conv2(self.res_relu1(self.res_bn1(self.res_conv1(x)))))
        x = self.res_relu2(x + residual)
        plain = self.branch(x)
        separable = self.relu_sep(self.pointwise(self.depthwise(x)))
        x = self.relu_mix(self.mix(torch.cat([plain, separable], dim=1)))
        x = self.relu_grouped(self.grouped(x))
        return self.fc(self.flatten(self.pool(x)))


def build(in_channels: int = 1, num_classes: int = 10, width: int = 16,
          pool: int = 1) -> nn.Module:
    return ResCatNet(in_channels, num_classes, width, pool)
