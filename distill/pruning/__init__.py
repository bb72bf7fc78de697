"""Structured pruning of the student: criteria, physical surgery, schedules and Lightning callbacks."""

from distill.pruning.callbacks import ChannelPruning, GroupLasso, NetworkSlimming
from distill.pruning.importance import (
    CRITERIA,
    HRankImportance,
    RandomImportance,
    TaylorImportance,
    resolve_importance,
)
from distill.pruning.schedule import PruningSchedule, PruningStep
from distill.pruning.surgery import PruneReport, channel_groups, check_target, prune_student, select_channels

__all__ = [
    "CRITERIA",
    "ChannelPruning",
    "GroupLasso",
    "HRankImportance",
    "NetworkSlimming",
    "PruneReport",
    "PruningSchedule",
    "PruningStep",
    "RandomImportance",
    "TaylorImportance",
    "channel_groups",
    "check_target",
    "prune_student",
    "resolve_importance",
    "select_channels",
]
