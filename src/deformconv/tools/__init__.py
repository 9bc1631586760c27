"""Tools around the layers: convolution arithmetic and per-model cost, separability and
factorization of kernels and layers, and where deformable layers sample (matplotlib is imported
only by the figure functions)."""

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
from deformconv.tools.visualize import (
    OffsetField,
    SamplingExample,
    SamplingLayer,
    offset_field,
    offset_field_figure,
    sampling_figure,
    sampling_points,
    unit_centre,
)

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
    "OffsetField",
    "SamplingExample",
    "SamplingLayer",
    "StepCost",
    "conv_cost",
    "factorize_conv",
    "factorize_kernel",
    "factorize_layers",
    "factorize_model",
    "kernel_names",
    "model_cost",
    "named_kernel",
    "offset_field",
    "offset_field_figure",
    "parse_kernel",
    "sampling_figure",
    "sampling_points",
    "spec_from_module",
    "to_depthwise_separable",
    "to_spatially_separable",
    "transposed_output_padding",
    "unit_centre",
]
