"""One pipeline per command: plan from headers, stream tensors through pure maths, commit atomically."""

from adaptertool.ops.demo import DemoConfig, DemoReport, demo
from adaptertool.ops.info import InfoReport, info
from adaptertool.ops.merge import MergeConfig, MergeReport, merge
from adaptertool.ops.reshard import ReshardConfig, ReshardReport, reshard
from adaptertool.ops.verify import VerifyReport, verify

__all__ = [
    "DemoConfig", "DemoReport", "InfoReport", "MergeConfig", "MergeReport", "ReshardConfig", "ReshardReport",
    "VerifyReport", "demo", "info", "merge", "reshard", "verify",
]
