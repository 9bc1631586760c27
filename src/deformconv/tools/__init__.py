"""Tools around the layers: convolution arithmetic and per-model cost, separability and
factorization of kernels and layers, and where deformable layers sample (matplotlib is imported
only by the figure functions)."""

from deformconv.tools.arithmetic import ConvCost, StepCost, conv_cost, transposed_output_padding
from deformconv.tools.conv_spec import KINDS, ConvSpec
from deformconv.tools.convert import Conversion, ConvertedLayer, convert_to_deformable
from deformconv.tools.factorize import (
    ConvFactorization,
    factorize_conv,
    to_depthwise_separable,
    to_spatially_separable,
)
from deformconv.tools.kernels import kernel_names, named_kernel, parse_kernel
from deformconv.tools.model_cost import LayerCost, ModelCost, model_cost
from deformconv.tools.model_factorization import (
    LayerReport,
    ModelFactorization,
    factorize_layers,
    factorize_model,
)
from deformconv.tools.module_spec import spec_from_module
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
    "Conversion",
    "ConvertedLayer",
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
    "convert_to_deformable",
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
