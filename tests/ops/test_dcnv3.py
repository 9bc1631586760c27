"""The DCNv3 and DCNv4 operators against an independent grid_sample formulation of InternImage's
``dcnv3_core_pytorch`` (tests/dcnv_reference.py): forward and the input, offset and mask
gradients over random configurations, gradcheck, the point order and padding rule, batch 0,
non-finite offsets, low precision and autocast, and the custom-op contract (opcheck,
torch.compile, torch.export)."""

from __future__ import annotations

import pytest
import torch

from dcnv_cases import Case, random_cases, tensors, upstream_grad
from dcnv_reference import dcnv3_grid_sample, dcnv4_grid_sample
from deformconv.ops import dcnv3, dcnv4

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
DCNV3_CASES = random_cases(66, seed=12, packed=False)
DCNV4_CASES = random_cases(32, seed=13, packed=True)


def _run(fn, case: Case, t: dict, packed: bool):
    """Output and gradients (input, offset[_mask], mask) of ``fn`` with upstream's arguments."""
    names = ["input", "offset_mask"] if packed else ["input", "offset", "mask"]
    leaves = [t[k].detach().clone().requires_grad_() for k in names]
    extra = (256,) if packed else ()
    args = case.args()
    out = fn(*leaves, *args[:-1], *extra, args[-1])
    grads = torch.autograd.grad(out, leaves, upstream_grad(out), allow_unused=True)
    return out.detach(), grads


def _reference(case: Case, t: dict, packed: bool):
    """The reference in float64 on the same (possibly rounded) values."""
    t64 = {k: v.double() for k, v in t.items()}
    return _run(dcnv4_grid_sample if packed else dcnv3_grid_sample, case, t64, packed)


def _assert_matches(case: Case, dtype: torch.dtype, packed: bool) -> None:
    t = tensors(case, dtype, packed)
    out, grads = _run(dcnv4 if packed else dcnv3, case, t, packed)
    assert out.dtype == dtype
    assert out.shape == (case.batch, *case.out_size(packed), case.group * case.group_channels)
    if case.batch == 0:
        assert all(
            g is not None and g.shape == v.shape for g, v in zip(grads, t.values(), strict=True)
        )
        return
    ref, ref_grads = _reference(case, t, packed)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, ref.to(dtype), rtol=tol, atol=tol)
    for name, g, r in zip(("input", "offset", "mask"), grads, ref_grads, strict=False):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g, r.to(dtype), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", DCNV3_CASES, ids=str)
def test_dcnv3_matches_grid_sample_reference(case: Case, dtype: torch.dtype) -> None:
    _assert_matches(case, dtype, packed=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", DCNV4_CASES, ids=str)
def test_dcnv4_matches_grid_sample_reference(case: Case, dtype: torch.dtype) -> None:
    """Packed offset_mask with junk in its padding columns, which must be ignored (and get
    zero gradient), as upstream's ``padded_offset_dim``."""
    _assert_matches(case, dtype, packed=True)
    if case.batch:
        t = tensors(case, dtype, packed=True)
        _, (_, grad_om) = _run(dcnv4, case, t, packed=True)
        used = 3 * case.group * case.points
        assert torch.count_nonzero(grad_om[..., used:]) == 0


def test_configurations_cover_the_acceptance_list() -> None:
    cases = DCNV3_CASES + DCNV4_CASES
    assert len(DCNV3_CASES) >= 60
    assert any(c.stride != (1, 1) for c in cases)
    assert any(2 in c.dilation for c in cases)
    assert any(c.offset_scale != 1 for c in cases)
    assert any(c.remove_center for c in DCNV3_CASES) and any(c.remove_center for c in DCNV4_CASES)
    for kernel in [(1, 1), (5, 5), (2, 3)]:
        assert any(c.kernel == kernel for c in cases), kernel
    assert any(c.group_channels % 16 and c.group_channels > 1 for c in cases)
    assert any(c.pad[0] != c.pad[1] for c in DCNV3_CASES)
    assert any(c.batch == 0 for c in cases) and any(not c.contiguous for c in cases)


GRADCHECK = [
    Case(1, 3, 3, 2, 2, (2, 2), (1, 1), (1, 1), (1, 1), 1.0, False),
    Case(1, 4, 5, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False),
    Case(1, 5, 6, 1, 2, (3, 3), (2, 1), (2, 1), (1, 2), 0.7, True),
    Case(1, 4, 4, 3, 1, (2, 3), (1, 2), (0, 1), (2, 1), 1.5, False),
]


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("case", GRADCHECK, ids=str)
def test_gradcheck(case: Case, packed: bool) -> None:
    t = tensors(case, torch.float64, packed, seed=4)
    leaves = [v.clone().requires_grad_() for v in t.values()]
    args = case.args()

    def fn(*xs):
        if packed:
            return dcnv4(*xs, *args[:-1], 256, args[-1])
        return dcnv3(*xs, *args)

    # One case column by column, the others by random projections (fast_mode), for time.
    fast = packed or case is not GRADCHECK[0]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, fast_mode=fast)


def test_points_are_ordered_x_outer_y_inner() -> None:
    """With zero offsets and a one-hot mask, point p reads kernel column p // kernel_h and row
    p % kernel_h (``_generate_dilation_grids``: meshgrid(x, y) flattened x-major)."""
    x = torch.arange(7 * 8, dtype=torch.float64).view(1, 7, 8, 1)
    kh, kw = 3, 2
    offset = torch.zeros(1, 5, 7, 2 * kh * kw, dtype=torch.float64)
    for p in range(kh * kw):
        mask = torch.zeros(1, 5, 7, kh * kw, dtype=torch.float64)
        mask[..., p] = 1
        out = dcnv3(x, offset, mask, kh, kw, 1, 1, 0, 0, 1, 1, 1, 1, 1.0, False)
        i, j = divmod(p, kh)
        torch.testing.assert_close(out, x[:, j : j + 5, i : i + 7])


def test_offsets_are_x_then_y_and_scaled() -> None:
    """A (dx, dy) = (2, 1) offset with offset_scale 0.5 moves a 1x1 kernel's sample by one
    column and half a row (``offset * offset_scale``; x first, as ``spatial_norm = [W, H]``)."""
    x = torch.randn(1, 6, 6, 2, dtype=torch.float64)
    offset = torch.tensor([2.0, 1.0], dtype=torch.float64).expand(1, 6, 6, 2)
    mask = torch.ones(1, 6, 6, 1, dtype=torch.float64)
    out = dcnv3(x, offset, mask, 1, 1, 1, 1, 0, 0, 1, 1, 1, 2, 0.5, False)
    shifted = torch.zeros_like(x)
    shifted[:, :5, :5] = 0.5 * (x[:, :5, 1:] + x[:, 1:, 1:])
    shifted[:, 5, :5] = 0.5 * x[:, 5, 1:]  # row 6 is outside: zero
    torch.testing.assert_close(out, shifted)


def test_dcnv3_pads_width_by_pad_h_and_height_by_pad_w() -> None:
    """``F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])`` in ``dcnv3_core_pytorch`` pads W by
    pad_h and H by pad_w; DCNv4's CUDA kernel pads H by pad_h (``dcnv4_cuda.cu``)."""
    x = torch.randn(1, 6, 6, 4)
    out3 = dcnv3(x, torch.zeros(1, 4, 8, 18), torch.ones(1, 4, 8, 9), 3, 3, 1, 1, 2, 0, 1, 1, 1, 4,
                 1.0, False)  # fmt: skip
    assert out3.shape == (1, 4, 8, 4)
    out4 = dcnv4(x, torch.zeros(1, 8, 4, 32), 3, 3, 1, 1, 2, 0, 1, 1, 1, 4, 1.0, 256, False)
    assert out4.shape == (1, 8, 4, 4)
    # With zero offsets and unit mask both are box sums over the zero-padded input.
    box = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(x.permute(0, 3, 1, 2), (2, 2, 0, 0)), 3, 1, divisor_override=1
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(out3, box)


def test_dcnv4_equals_dcnv3_with_the_same_offsets_and_mask() -> None:
    case = Case(2, 7, 6, 3, 5, (3, 3), (1, 2), (1, 1), (2, 1), 0.8, True)
    t = tensors(case, torch.float64, packed=False, seed=9)
    n, ho, wo = t["offset"].shape[:3]
    g, p = case.group, case.points
    packed = torch.cat(
        (t["offset"].view(n, ho, wo, g, 2 * p), t["mask"].view(n, ho, wo, g, p)), dim=-1
    ).flatten(3)
    args = case.args()
    torch.testing.assert_close(
        dcnv4(t["input"], packed, *args[:-1], 256, args[-1]),
        dcnv3(t["input"], t["offset"], t["mask"], *args),
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_and_far_offsets_read_zero(bad: float) -> None:
    """A point at a non-finite or far-away position contributes zero and gets zero gradient,
    as a point outside the image (bilinear with zeros outside)."""
    case = Case(1, 5, 5, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False)
    t = tensors(case, torch.float64, packed=False, seed=2)
    poisoned = t["offset"].clone()
    poisoned[0, 2, 3, 9 * 2 + 4 * 2] = bad  # group 1, point 4, x
    silenced = t["mask"].clone()
    silenced[0, 2, 3, 9 + 4] = 0
    leaf = poisoned.requires_grad_()
    out = dcnv3(t["input"], leaf, t["mask"], *case.args())
    expected = dcnv3(t["input"], t["offset"], silenced, *case.args())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert leaf.grad[0, 2, 3, 26] == 0 and leaf.grad[0, 2, 3, 27] == 0


def _away_from_kinks(t: dict, case: Case, packed: bool) -> dict:
    """Offsets whose fractional parts lie in [0.25, 0.75]: with integer kernel positions and
    offset_scale 1 no sampling position is near an integer, where bilinear sampling has a kink
    and low-precision rounding could pick either one-sided derivative."""
    t = dict(t)
    key = "offset_mask" if packed else "offset"
    om = t[key].clone()
    offsets = om
    if packed:
        groups = om[..., : 3 * case.group * case.points].unflatten(-1, (case.group, -1))
        offsets = groups[..., : 2 * case.points]
    offsets.copy_(offsets.floor() + 0.25 + 0.5 * torch.rand(offsets.shape, generator=_GEN))
    t[key] = om
    return t


_GEN = torch.Generator().manual_seed(6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_low_precision_matches_float32(dtype: torch.dtype, packed: bool) -> None:
    """Low precision computes in float32 and returns its own dtype; the reference is the
    grid_sample formulation in float64 on the same rounded values."""
    case = Case(2, 6, 5, 2, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False)
    t = _away_from_kinks(tensors(case, torch.float32, packed), case, packed)
    low = {k: v.to(dtype) for k, v in t.items()}
    out, grads = _run(dcnv4 if packed else dcnv3, case, low, packed)
    ref, ref_grads = _reference(case, low, packed)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_autocast_runs_in_the_autocast_dtype(packed: bool) -> None:
    """As deform_conv2d under autocast: float32 tensors are cast to the autocast dtype."""
    case = Case(1, 5, 5, 2, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, False)
    t = tensors(case, torch.float32, packed)
    args = case.args()
    fn = (lambda *xs: dcnv4(*xs, *args[:-1], 256, args[-1])) if packed else (
        lambda *xs: dcnv3(*xs, *args)
    )  # fmt: skip
    expected = fn(*t.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*t.values())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def _op_args(packed: bool):
    case = Case(2, 5, 6, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1), 0.9, False)
    t = tensors(case, torch.float32, packed, seed=5)
    return [v.requires_grad_() for v in t.values()], case.args()


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_opcheck(packed: bool) -> None:
    leaves, args = _op_args(packed)
    op = torch.ops.deformconv.dcnv4 if packed else torch.ops.deformconv.dcnv3
    torch.library.opcheck(op.default, (*leaves, *args))
    out = op.default(*leaves, *args)
    backward = (
        torch.ops.deformconv.dcnv4_backward if packed else torch.ops.deformconv.dcnv3_backward
    )
    detached = [v.detach() for v in leaves]
    torch.library.opcheck(backward.default, (torch.randn_like(out).detach(), *detached, *args))


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_compile_fullgraph_forward_and_backward(packed: bool) -> None:
    torch._dynamo.reset()
    leaves, args = _op_args(packed)

    def fn(*xs):
        if packed:
            return dcnv4(*xs, *args[:-1], 256, args[-1]).relu().sum()
        return dcnv3(*xs, *args).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_export(packed: bool) -> None:
    leaves, args = _op_args(packed)

    class Net(torch.nn.Module):
        def forward(self, *xs):
            if packed:
                return dcnv4(*xs, *args[:-1], 256, args[-1])
            return dcnv3(*xs, *args)

    inputs = tuple(v.detach() for v in leaves)
    exported = torch.export.export(Net(), inputs)
    name = "deformconv.dcnv4" if packed else "deformconv.dcnv3"
    assert any(name in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*inputs), Net()(*inputs))
