"""When to prune and how much: one schedule notion for ``ChannelPruning`` and ``distill prune-distill``.

A :class:`PruningSchedule` is a small dataclass usable from YAML: its k-th step says how much to prune.
``ChannelPruning`` takes step k at the end of the k-th scheduled epoch; ``distill prune-distill`` takes it
in round k (:func:`round_schedule`). A callback's schedule may also be any function of the epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ROUND_SCHEDULES", "PruningSchedule", "PruningStep", "ScheduleFn", "round_schedule"]


@dataclass(frozen=True)
class PruningStep:
    """One pruning step: exactly one of a ratio of the current channels, or a parameter/MAC target."""

    ratio: float | None = None
    target_params: int | None = None
    target_macs: int | None = None


#: A schedule as a function: epoch -> what to prune at the end of that epoch (``None``: nothing).
ScheduleFn = Callable[[int], PruningStep | float | None]


@dataclass
class PruningSchedule:
    """Prune at the end of epochs ``start_epoch, start_epoch + every, ...``, ``steps`` times.

    Give one of ``ratio`` (per step), ``final_ratio``, ``target_params`` or ``target_macs``:

    - ``ratio``: every step removes this fraction of the current channels (seed 004's homework:
      ``0.05``, i.e. width x 0.95 per round).
    - ``final_ratio``: the fraction of the initial channels removed after the last step, in equal
      geometric steps (each step keeps ``(1 - final_ratio) ** (1 / steps)``).
    - ``target_params`` / ``target_macs``: the size after the last step, reached through geometric
      intermediate sizes.

    Args:
        start_epoch: the first epoch (0-based) at whose end the student is pruned.
        every: epochs between pruning steps.
        steps: number of pruning steps.
        ratio: fraction of the current channels each step removes.
        final_ratio: fraction of the initial channels removed by all steps together.
        target_params: parameters after the last step.
        target_macs: MACs (per forward of one example) after the last step.
    """

    start_epoch: int = 0
    every: int = 1
    steps: int = 1
    ratio: float | None = None
    final_ratio: float | None = None
    target_params: int | None = None
    target_macs: int | None = None

    def __post_init__(self) -> None:
        amounts = {k: v for k, v in self._amounts().items() if v is not None}
        if len(amounts) != 1:
            given = amounts or "none"
            raise ValueError(
                f"PruningSchedule needs one of ratio, final_ratio, target_params, target_macs; got {given}"
            )
        if self.start_epoch < 0 or self.every < 1 or self.steps < 1:
            raise ValueError(
                f"need start_epoch >= 0, every >= 1 and steps >= 1; got {self.start_epoch}, {self.every}, {self.steps}"
            )
        for name in ("ratio", "final_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (a fraction of channels to remove), got {value}")
        for name in ("target_params", "target_macs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive count, got {value}")

    def _amounts(self) -> dict[str, float | int | None]:
        return {
            "ratio": self.ratio,
            "final_ratio": self.final_ratio,
            "target_params": self.target_params,
            "target_macs": self.target_macs,
        }

    def epochs(self) -> list[int]:
        """The epochs at whose end pruning happens."""
        return [self.start_epoch + i * self.every for i in range(self.steps)]

    def step_at(self, epoch: int, initial_params: int, initial_macs: int) -> PruningStep | None:
        """What to prune at the end of ``epoch``, given the student's size before the first step."""
        if epoch not in self.epochs():
            return None
        return self.step(self.epochs().index(epoch) + 1, initial_params, initial_macs)

    def step(self, k: int, initial_params: int, initial_macs: int) -> PruningStep:
        """What step ``k`` (1-based, at most ``steps``) prunes, given the size before the first step."""
        if self.ratio is not None:
            return PruningStep(ratio=self.ratio)
        if self.final_ratio is not None:
            return PruningStep(ratio=1.0 - (1.0 - self.final_ratio) ** (1.0 / self.steps))
        if self.target_params is not None:
            return PruningStep(target_params=_geometric(initial_params, self.target_params, k, self.steps))
        return PruningStep(target_macs=_geometric(initial_macs, self.target_macs, k, self.steps))


def _geometric(start: int, end: int, k: int, steps: int) -> int:
    """The k-th of ``steps`` geometric steps from ``start`` to ``end`` (the last one is ``end`` exactly)."""
    return end if k == steps else round(start * (end / start) ** (k / steps))


#: The schedules of ``distill prune-distill``'s rounds.
ROUND_SCHEDULES = ("fixed", "geometric")


def round_schedule(
    kind: str, rounds: int, ratio: float, max_rounds: int, target_params: int | None, target_macs: int | None
) -> PruningSchedule:
    """The schedule of prune-distill's rounds: ``geometric`` reaches the target in ``rounds`` steps of equal
    relative size; ``fixed`` removes ``ratio`` of the channels per round, for up to ``max_rounds`` rounds."""
    if kind not in ROUND_SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; choose one of {', '.join(ROUND_SCHEDULES)}")
    if kind == "fixed":
        return PruningSchedule(steps=max_rounds, ratio=ratio)
    return PruningSchedule(steps=rounds, target_params=target_params, target_macs=target_macs)
