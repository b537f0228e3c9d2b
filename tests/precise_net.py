"""The float64 network and batches of ``test_precise_bn.py`` (its 2-process SyncCBN script
imports them too): conv, CBN k=3, conv, plain BN, conv, CBN k=2, a dropout of 0."""
import torch
from torch import nn

import cbn_plugin


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm1 = cbn_plugin.CBN(4, window_size=3)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(5)
        self.conv3 = nn.Conv2d(5, 6, 1)
        self.norm3 = cbn_plugin.CBN(6, window_size=2)
        self.drop = nn.Dropout(0.0)  # mode changes are visible on it

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.drop(torch.relu(self.norm3(self.conv3(x))))


def make_net():
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        for norm in (net.norm1, net.norm2, net.norm3):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1, 1)
    return net


def make_batches(n=9, size=2):
    g = torch.Generator().manual_seed(1)
    # Per-batch offsets: the batches differ, so pooling k of them matters.
    return [torch.randn(size, 3, 5, 5, generator=g, dtype=torch.float64) * 2
            + torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64) for _ in range(n)]
