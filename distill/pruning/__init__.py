"""Structured pruning of the student: criteria, the policy, physical surgery, schedules and Lightning callbacks."""

from distill.pruning.callbacks import ChannelPruning, GroupLasso, NetworkSlimming
from distill.pruning.importance import (
    CRITERIA,
    HRankImportance,
    RandomImportance,
    TaylorImportance,
    resolve_importance,
)
from distill.pruning.policy import CHANNEL_MULTIPLE, PruningPolicy, labelled_batches
from distill.pruning.schedule import ROUND_SCHEDULES, PruningSchedule, PruningStep, round_schedule
from distill.pruning.search import LatencyMeasure, latency_plan
from distill.pruning.surgery import (
    PruneReport,
    UnprunableLayers,
    channel_counts,
    channel_groups,
    check_latency_target,
    check_target,
    prune_student,
    runnable_plan,
    select_channels,
)

__all__ = [
    "CHANNEL_MULTIPLE",
    "CRITERIA",
    "ROUND_SCHEDULES",
    "ChannelPruning",
    "GroupLasso",
    "HRankImportance",
    "LatencyMeasure",
    "NetworkSlimming",
    "PruneReport",
    "PruningPolicy",
    "PruningSchedule",
    "PruningStep",
    "RandomImportance",
    "TaylorImportance",
    "UnprunableLayers",
    "channel_counts",
    "channel_groups",
    "check_latency_target",
    "check_target",
    "labelled_batches",
    "latency_plan",
    "prune_student",
    "resolve_importance",
    "round_schedule",
    "runnable_plan",
    "select_channels",
]
