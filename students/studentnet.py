"""StudentNet: the depthwise/pointwise student of seed 004 (Hung-yi Lee's ML2020 homework 7).

Depthwise-separable convolutions as in MobileNet (Howard et al. 2017). At its defaults it is
exactly the seed network (256,779 parameters for 3 input channels and 11 classes), with the same
module names, so the seed's state_dicts load. The per-layer widths are an explicit list
(``channels``): a pruned StudentNet is a StudentNet built from another list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["UNSCALED_LAYERS", "StudentNet", "studentnet_channels", "thin_channels", "width_for_params"]

#: Width multipliers of the eight layers relative to ``base`` (seed 004).
_MULTIPLIERS = (1, 2, 4, 8, 16, 16, 16, 16)
#: Layers that ``width_mult`` scales (seed 004 scales bandwidth[3..6] only).
_SCALED_LAYERS = range(3, 7)
_MAX_POOLS = 4
#: Names of the layers whose output channels ``width_mult`` leaves alone (the stem, blocks 0, 1 and 6):
#: pruning all other layers of a StudentNet gives the layout of a thinner ``width_mult``.
UNSCALED_LAYERS = ("cnn.0.0", "cnn.1.3", "cnn.2.3", "cnn.7.3")


def studentnet_channels(base: int = 16, width_mult: float = 1.0) -> list[int]:
    """Per-layer widths of seed 004: ``base * [1, 2, 4, 8, 16, 16, 16, 16]``, layers 3..6 times ``width_mult``."""
    if base < 1:
        raise ValueError(f"base must be a positive number of channels, got {base}")
    if not 0 < width_mult < math.inf:
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult}")
    channels = [base * m for m in _MULTIPLIERS]
    for i in _SCALED_LAYERS:
        channels[i] = max(1, int(channels[i] * width_mult))
    return channels


def _check_channels(channels: Sequence[int]) -> list[int]:
    channels = [int(c) for c in channels]
    if len(channels) != len(_MULTIPLIERS) or any(c < 1 for c in channels):
        raise ValueError(
            f"channels must list {len(_MULTIPLIERS)} positive widths (the stem, then the output of each of "
            f"the 7 blocks), got {list(channels)}"
        )
    return channels


class StudentNet(nn.Module):
    """Depthwise/pointwise CNN student (seed 004).

    Layout: a 3x3 conv stem (conv, BN, ReLU6, max-pool), then seven blocks, each a 3x3 depthwise conv,
    BN, ReLU6 and a 1x1 pointwise conv with no activation after it; blocks 0..2 end with a max-pool.
    The head is global average pooling and one linear layer.

    Args:
        base: channels of the stem; the layers have ``base * [1, 2, 4, 8, 16, 16, 16, 16]``.
        width_mult: multiplies the widths of layers 3..6, as in the seed ("for later network pruning").
        num_classes: outputs of the classifier (seed: 11, Food-11).
        in_chans: input image channels (seed: 3).
        channels: the eight per-layer widths, overriding ``base`` and ``width_mult``. This is how a
            pruned student is rebuilt.
        num_pools: how many of the four 2x2 max-pools to keep (stem, blocks 0..2, dropped from the last
            one). The seed's 4 shrinks a 28x28 input to 1x1 before the last four blocks; 2 keeps 7x7 there.
            Parameters do not change; MACs of the later blocks grow 4x for each pool removed.
    """

    def __init__(
        self,
        base: int = 16,
        width_mult: float = 1.0,
        num_classes: int = 11,
        in_chans: int = 3,
        channels: Sequence[int] | None = None,
        num_pools: int = _MAX_POOLS,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}")
        if not 0 <= num_pools <= _MAX_POOLS:
            raise ValueError(f"num_pools must be between 0 and {_MAX_POOLS}, got {num_pools}")
        bw = _check_channels(channels) if channels is not None else studentnet_channels(base, width_mult)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_pools = num_pools

        def pool(stage: int) -> nn.Module:
            return nn.MaxPool2d(2, 2, 0) if stage < num_pools else nn.Identity()

        stem = nn.Sequential(nn.Conv2d(in_chans, bw[0], 3, 1, 1), nn.BatchNorm2d(bw[0]), nn.ReLU6(), pool(0))
        blocks = []
        for i in range(7):
            layers = [
                nn.Conv2d(bw[i], bw[i], 3, 1, 1, groups=bw[i]),  # depthwise
                nn.BatchNorm2d(bw[i]),
                nn.ReLU6(),
                nn.Conv2d(bw[i], bw[i + 1], 1),  # pointwise, no activation after it
            ]
            if i < 3:
                layers.append(pool(i + 1))
            blocks.append(nn.Sequential(*layers))
        # Module names follow the seed (cnn.*, fc.0) so its state_dicts load unchanged.
        self.cnn = nn.Sequential(stem, *blocks, nn.AdaptiveAvgPool2d((1, 1)))
        self.fc = nn.Sequential(nn.Linear(bw[7], num_classes))

    @property
    def channels(self) -> list[int]:
        """The eight per-layer widths, read from the modules (so they follow pruning)."""
        return [self.cnn[0][0].out_channels] + [self.cnn[i][3].out_channels for i in range(1, 8)]

    @property
    def num_features(self) -> int:
        return self.fc[0].in_features

    @property
    def model_spec(self) -> dict[str, Any]:
        """Name and arguments that rebuild this architecture with :func:`students.create_student`."""
        return {
            "name": "studentnet",
            "kwargs": {
                "channels": self.channels,
                "num_classes": self.num_classes,
                "in_chans": self.in_chans,
                "num_pools": self.num_pools,
            },
        }

    def get_classifier(self) -> nn.Module:
        return self.fc[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before global pooling, shape (N, channels[7], H', W')."""
        return self.cnn[:-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.cnn[-1](x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def width_for_params(params: int, **kwargs: Any) -> float | None:
    """The largest ``width_mult`` (4 decimals, rounded down) whose StudentNet has at most ``params`` parameters.

    ``kwargs`` are the other arguments of :class:`StudentNet`; their ``width_mult`` (default 1.0) is the
    widest considered. ``None`` when even ``width_mult=0.01`` has more parameters. Used to build the thin
    StudentNet that a pruned student of the same size is compared with.
    """

    def count(width: float) -> int:
        return sum(p.numel() for p in StudentNet(**{**kwargs, "width_mult": width}).parameters())

    lo, hi = 0.01, float(kwargs.get("width_mult", 1.0))
    if count(lo) > params:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) <= params else (lo, mid)
    return math.floor(lo * 1e4) / 1e4  # rounded down: never more parameters than ``params``


def thin_channels(params: int, multiple: int, **kwargs: Any) -> list[int] | None:
    """The channels of the widest StudentNet of at most ``params`` parameters whose layers ``width_mult`` scales
    (3..6, in its 1:2 ratio) are multiples of ``multiple``: a thin StudentNet that runs as fast as its width allows
    (odd channel counts run several times slower in ONNX Runtime). ``None`` when even ``multiple`` channels there
    have more parameters. ``kwargs``: the other arguments of :class:`StudentNet`; their ``width_mult`` (default
    1.0) is the widest considered, as for :func:`width_for_params`.

    Given as channels, not as a ``width_mult``: ``k * multiple / (8 * base)`` times ``8 * base`` may fall a hair
    short of ``k * multiple`` in floating point, and ``int`` would take one channel off.
    """
    widest = float(kwargs.get("width_mult", 1.0))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("width_mult", "channels")}
    full = studentnet_channels(kwargs.pop("base", 16))
    unit = full[_SCALED_LAYERS[0]]
    for k in range(int(unit * widest) // multiple, 0, -1):
        channels = [k * multiple * c // unit if i in _SCALED_LAYERS else c for i, c in enumerate(full)]
        if sum(p.numel() for p in StudentNet(**kwargs, channels=channels).parameters()) <= params:
            return channels
    return None
