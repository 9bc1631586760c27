"""Functional operators: deformable convolution, its memory budget and its kernel choice."""

from deformconv.ops._buffers import release_cpu_buffers
from deformconv.ops._dispatch import KernelFallbackWarning, active_kernel, kernel_names, use_kernel
from deformconv.ops._geometry import output_size
from deformconv.ops._workspace import get_workspace_budget, set_workspace_budget, workspace_budget
from deformconv.ops.dcnv3 import dcnv3, dcnv4
from deformconv.ops.deform_conv import deform_conv2d

__all__ = [
    "KernelFallbackWarning",
    "active_kernel",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "get_workspace_budget",
    "kernel_names",
    "output_size",
    "release_cpu_buffers",
    "set_workspace_budget",
    "use_kernel",
    "workspace_budget",
]
