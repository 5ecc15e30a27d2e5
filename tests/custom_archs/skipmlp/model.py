import torch
from torch import nn


class SkipMLP(nn.Module):
    """flatten -> fc_in -> relu -> (fc_a -> relu -> fc_b) + skip -> relu -> out."""

    def __init__(self, in_features: int, num_classes: int, hidden: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc_in = nn.Linear(in_features, hidden)
        self.act_in = nn.ReLU()
        self.fc_a = nn.Linear(hidden, hidden)
        self.act_a = nn.ReLU()
        self.fc_b = nn.Linear(hidden, hidden)
        self.act_out = nn.ReLU()
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_in(self.fc_in(self.flatten(x)))
        h = self.act_out(h + self.fc_b(self.act_a(self.fc_a(h))))
        return self.out(h)


def build(in_features: int = 64, num_classes: int = 10, hidden: int = 64) -> nn.Module:
    return SkipMLP(in_features, num_classes, hidden)
