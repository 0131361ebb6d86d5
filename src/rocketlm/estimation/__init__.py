"""``rocketlm estimate``: projected time and peak memory of every stage of a compression run, from
the model's config and kernels timed on this device (no weights are read)."""
from rocketlm.estimation.estimate import (H100, CostEstimate, EstimateOptions, TargetDevice, estimate,
                                          project_to_device)
from rocketlm.estimation.project import Component, StageEstimate

__all__ = ["H100", "Component", "CostEstimate", "EstimateOptions", "StageEstimate", "TargetDevice", "estimate",
           "project_to_device"]
