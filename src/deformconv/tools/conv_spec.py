"""A convolution layer described by its hyper-parameters: :class:`ConvSpec`, with no tensors.

:func:`~deformconv.tools.arithmetic.conv_cost` counts what a described layer costs;
:func:`~deformconv.tools.module_spec.spec_from_module` describes an existing layer.

Kinds (``ConvSpec.kind``) and the layers they describe:

=========================  ===================================================================
``"conv"``                 ``nn.Conv2d``: plain, grouped (``groups``), dilated (``dilation``)
``"transposed"``           ``nn.ConvTranspose2d`` (``output_padding``, ``groups``, ``dilation``)
``"depthwise"``            :class:`~deformconv.nn.depthwise.DepthwiseConv2d`
``"separable"``            :class:`~deformconv.nn.separable.SeparableConv2d`
``"spatial"``              :class:`~deformconv.nn.spatial.SpatiallySeparableConv2d`
``"deformable"``           :class:`~deformconv.nn.deform_conv.DeformableConv2d` (v2 when
                           ``modulated``, v1 otherwise); with ``offset_branch=False``,
                           ``DeformConv2d`` (ours or torchvision's), whose offsets come from
                           elsewhere
``"deformable_separable"`` :class:`~deformconv.nn.separable.DeformableSeparableConv2d`
=========================  ===================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from deformconv._validation import Pair, check_int, padding_pair, to_pair

__all__ = ["KINDS", "ConvSpec"]

KINDS: tuple[str, ...] = (
    "conv",
    "transposed",
    "depthwise",
    "separable",
    "spatial",
    "deformable",
    "deformable_separable",
)

_DEFORMABLE = ("deformable", "deformable_separable")
_MULTIPLIED = ("depthwise", "separable", "deformable_separable")
# Which kinds each optional field applies to; a non-default value elsewhere is an error.
_APPLIES: dict[str, tuple[str, ...]] = {
    "groups": ("conv", "transposed", "deformable"),
    "depth_multiplier": _MULTIPLIED,
    "output_padding": ("transposed",),
    "offset_groups": _DEFORMABLE,
    "modulated": _DEFORMABLE,
    "offset_branch": _DEFORMABLE,
    "per_channel": ("spatial",),
    "mid_channels": ("spatial",),
}
_DEFAULTS: dict[str, Any] = {
    "groups": 1,
    "depth_multiplier": 1,
    "output_padding": (0, 0),
    "offset_groups": 1,
    "modulated": True,
    "offset_branch": True,
    "per_channel": False,
    "mid_channels": None,
}


@dataclass(frozen=True)
class ConvSpec:
    """A convolution layer described by its hyper-parameters (no tensors).

    Integers given for pair fields are expanded to ``(height, width)`` and every field is checked
    on construction.

    Attributes:
        kind: one of :data:`KINDS`.
        in_channels: channels of the input.
        out_channels: channels of the output; for ``"depthwise"`` it is
            ``in_channels * depth_multiplier`` and may be left ``None``.
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: zeros ``(ph, pw)`` on each side, or ``"same"`` (TensorFlow's rule, see
            :func:`~deformconv.nn.depthwise.same_padding`; kinds conv, depthwise, separable and
            spatial) or ``"valid"`` (stored as ``(0, 0)``).
        dilation: ``(dh, dw)``.
        groups: channel groups (conv, transposed, deformable).
        depth_multiplier: depthwise filters per input channel (depthwise, separable,
            deformable_separable).
        output_padding: extra rows and columns of a transposed convolution; each must be smaller
            than the stride or the dilation along its dimension.
        bias: the layer adds a bias (after the pointwise step for separable kinds).
        offset_groups: groups of input channels sharing one offset field (deformable kinds).
        modulated: deformable v2 (offsets and a mask) rather than v1 (offsets only).
        offset_branch: the layer predicts its offsets with its own convolution, as
            :class:`~deformconv.nn.deform_conv.DeformableConv2d` does.
        per_channel: spatially separable passes filter each channel on its own.
        mid_channels: channels between the two spatially separable passes; ``None`` becomes
            ``out_channels``, or ``in_channels`` when ``per_channel``.

    Example:
        >>> ConvSpec("separable", 3, 256, kernel_size=5)
        ConvSpec(kind='separable', in_channels=3, out_channels=256, kernel_size=(5, 5))
        >>> ConvSpec("conv", 6, 8, 3, groups=4)
        Traceback (most recent call last):
        ...
        ValueError: in_channels=6 must be divisible by groups=4
    """

    kind: str
    in_channels: int
    out_channels: int | None = None
    kernel_size: Pair | int = 3
    stride: Pair | int = 1
    padding: Pair | int | str = 0
    dilation: Pair | int = 1
    groups: int = 1
    depth_multiplier: int = 1
    output_padding: Pair | int = 0
    bias: bool = True
    offset_groups: int = 1
    modulated: bool = True
    offset_branch: bool = True
    per_channel: bool = False
    mid_channels: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        kind = self.kind
        fix = object.__setattr__
        check_int(self.in_channels, "in_channels")
        fix(self, "kernel_size", to_pair(self.kernel_size, "kernel_size", 1))
        fix(self, "stride", to_pair(self.stride, "stride", 1))
        fix(self, "dilation", to_pair(self.dilation, "dilation", 1))
        fix(self, "output_padding", to_pair(self.output_padding, "output_padding", 0))
        fix(self, "padding", padding_pair(self.padding))
        if self.padding == "same" and kind in ("transposed", *_DEFORMABLE):
            raise ValueError(
                f"padding='same' applies to kinds conv, depthwise, separable and spatial, "
                f"not {kind!r}; give the padding in zeros"
            )
        for name, kinds in _APPLIES.items():
            value = getattr(self, name)
            if kind not in kinds and value != _DEFAULTS[name]:
                raise ValueError(
                    f"{name} applies to kinds {', '.join(kinds)}, not {kind!r}; got {name}={value!r}"
                )
        check_int(self.groups, "groups")
        check_int(self.depth_multiplier, "depth_multiplier")
        check_int(self.offset_groups, "offset_groups")
        if kind == "depthwise":
            expected = self.in_channels * self.depth_multiplier
            if self.out_channels not in (None, expected):
                raise ValueError(
                    f"out_channels of a depthwise convolution is in_channels * depth_multiplier "
                    f"= {expected}; got out_channels={self.out_channels}"
                )
            fix(self, "out_channels", expected)
        elif self.out_channels is None:
            raise ValueError(f"out_channels is required for kind {kind!r}")
        check_int(self.out_channels, "out_channels")
        for channels in ("in_channels", "out_channels"):
            if getattr(self, channels) % self.groups:
                raise ValueError(
                    f"{channels}={getattr(self, channels)} must be divisible by groups={self.groups}"
                )
        if self.in_channels % self.offset_groups:
            raise ValueError(
                f"in_channels={self.in_channels} must be divisible by "
                f"offset_groups={self.offset_groups}"
            )
        if kind == "transposed":
            for axis, op, s, d in zip(
                ("height", "width"), self.output_padding, self.stride, self.dilation, strict=True
            ):
                if op >= max(s, d):
                    raise ValueError(
                        f"output_padding along {axis} must be smaller than the stride ({s}) or the "
                        f"dilation ({d}); got {op}"
                    )
        if kind == "spatial":
            if self.per_channel:
                if self.out_channels != self.in_channels:
                    raise ValueError(
                        "out_channels must equal in_channels when per_channel=True, got "
                        f"in_channels={self.in_channels}, out_channels={self.out_channels}"
                    )
                if self.mid_channels not in (None, self.in_channels):
                    raise ValueError(
                        "mid_channels must be None or in_channels when per_channel=True, got "
                        f"{self.mid_channels}"
                    )
                fix(self, "mid_channels", self.in_channels)
            elif self.mid_channels is None:
                fix(self, "mid_channels", self.out_channels)
            else:
                check_int(self.mid_channels, "mid_channels")

    def __repr__(self) -> str:
        shown = [
            f"kind={self.kind!r}",
            f"in_channels={self.in_channels}",
            f"out_channels={self.out_channels}",
            f"kernel_size={self.kernel_size}",
        ]
        for field in dataclasses.fields(self)[4:]:
            value, default = getattr(self, field.name), field.default
            if field.name in ("stride", "padding", "dilation", "output_padding"):
                default = (default, default)
            if value != default:
                shown.append(f"{field.name}={value!r}")
        return f"ConvSpec({', '.join(shown)})"

    @property
    def mid(self) -> int:
        """Channels between the steps: ``in_channels * depth_multiplier`` for the separable
        kinds, the channels between the passes for ``"spatial"``, else ``out_channels``."""
        if self.kind in _MULTIPLIED:
            return self.in_channels * self.depth_multiplier
        if self.kind == "spatial":
            return self.mid_channels  # type: ignore[return-value]
        return self.out_channels  # type: ignore[return-value]

    @property
    def title(self) -> str:
        """A short human name, e.g. ``"grouped convolution (groups=4)"``.

        Example:
            >>> ConvSpec("conv", 8, 8, dilation=2).title
            'dilated convolution (dilation=2)'
            >>> ConvSpec("deformable", 8, 8, modulated=False).title
            'deformable convolution v1'
        """
        if self.kind == "conv":
            notes = []
            if self.groups > 1:
                notes.append(f"groups={self.groups}")
            if self.dilation != (1, 1):
                notes.append(f"dilation={_pair_text(self.dilation)}")
            name = "grouped " if self.groups > 1 else ""
            name += "dilated " if self.dilation != (1, 1) else ""
            return f"{name}convolution" + (f" ({', '.join(notes)})" if notes else "")
        version = " v2" if self.modulated else " v1"
        return {
            "transposed": "transposed convolution",
            "depthwise": "depthwise convolution",
            "separable": "depthwise separable convolution",
            "spatial": "spatially separable convolution"
            + (" (per channel)" if self.per_channel else ""),
            "deformable": "deformable convolution" + version,
            "deformable_separable": "deformable depthwise separable convolution" + version,
        }[self.kind]


def _pair_text(pair: tuple[int, ...] | str) -> str:
    """``"3"`` for ``(3, 3)``, ``"3x5"`` for ``(3, 5)``; a string (``"same"``) as it is."""
    if isinstance(pair, str):
        return pair
    return str(pair[0]) if len(set(pair)) == 1 else "x".join(map(str, pair))
