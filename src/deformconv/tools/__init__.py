"""Tools around the layers: convolution arithmetic and per-model cost."""

from deformconv.tools.arithmetic import (
    KINDS,
    ConvCost,
    ConvSpec,
    StepCost,
    conv_cost,
    spec_from_module,
    transposed_output_padding,
)
from deformconv.tools.factorize import (
    ConvFactorization,
    LayerReport,
    ModelFactorization,
    factorize_conv,
    factorize_layers,
    factorize_model,
    to_depthwise_separable,
    to_spatially_separable,
)
from deformconv.tools.kernels import kernel_names, named_kernel, parse_kernel
from deformconv.tools.model_cost import LayerCost, ModelCost, model_cost
from deformconv.tools.separability import KernelFactorization, factorize_kernel

__all__ = [
    "KINDS",
    "ConvCost",
    "ConvFactorization",
    "ConvSpec",
    "KernelFactorization",
    "LayerCost",
    "LayerReport",
    "ModelCost",
    "ModelFactorization",
    "StepCost",
    "conv_cost",
    "factorize_conv",
    "factorize_kernel",
    "factorize_layers",
    "factorize_model",
    "kernel_names",
    "model_cost",
    "named_kernel",
    "parse_kernel",
    "spec_from_module",
    "to_depthwise_separable",
    "to_spatially_separable",
    "transposed_output_padding",
]
