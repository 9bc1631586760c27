"""Functional operators: deformable convolution and its memory budget."""

from deformconv.ops._workspace import get_workspace_budget, set_workspace_budget, workspace_budget
from deformconv.ops.deform_conv import deform_conv2d

__all__ = ["deform_conv2d", "get_workspace_budget", "set_workspace_budget", "workspace_budget"]
