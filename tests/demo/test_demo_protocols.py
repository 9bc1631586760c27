from __future__ import annotations

import json

import pytest
import torch

from deformconv.demo.data import Deformation
from deformconv.demo.occlusion import Occlusion
from deformconv.demo.protocols import DemoConfig, load_data, run_demo
from deformconv.demo.train import evaluate
from deformconv.nn import DeformableConv2d

TINY = {"size": 16, "limit": 48, "channels": (4, 4, 8, 8), "epochs": 1, "finetune_epochs": 1}


@pytest.fixture(scope="module")
def result():
    return run_demo(DemoConfig(**TINY, seed=4))


def test_rows_and_numbers(result):
    assert [p.protocol for p in result.protocols] == [1, 2, 3]
    assert [r.name for r in result.protocols[0].rows] == ["regular CNN", "deformable CNN"]
    assert [r.name for r in result.protocols[2].rows] == ["regular CNN", "deformable CNN"]
    assert [r.name for r in result.protocols[1].rows] == [
        "regular CNN (plain)",
        "deformable: offsets",
        "control: fine-tuned",
    ]
    for protocol in result.protocols:
        for row in protocol.rows:
            for accuracy in (row.plain_accuracy, row.deformed_accuracy, row.occluded_accuracy):
                assert 0.0 <= accuracy <= 1.0
            assert row.seconds_per_epoch > 0
    p1, p2, p3 = result.protocols
    assert p1.rows[1].parameters > p1.rows[0].parameters == p1.rows[0].trainable_parameters
    offsets = sum(
        p.numel()
        for m in p2.models["deformable: offsets"].modules()
        if isinstance(m, DeformableConv2d)
        for p in m.conv_offset.parameters()
    )
    assert p2.rows[1].trainable_parameters == offsets
    assert result.sizes == {"train": 48, "val": 179, "test": 359}
    assert result.test_deformed.scales is not None
    assert not torch.equal(result.test_deformed.images, result.test_plain.images)
    assert p3.rows[1].parameters == p1.rows[1].parameters


def test_occluded_test_digits(result):
    occluded, plain = result.test_occluded, result.test_plain
    assert occluded.occluders is not None and occluded.scales is None
    assert torch.equal(occluded.labels, plain.labels)
    assert torch.equal(occluded.images[~occluded.occluders], plain.images[~occluded.occluders])
    assert torch.equal(
        occluded.images[occluded.occluders],
        torch.full_like(occluded.images[occluded.occluders], 0.5),
    )
    # The accuracy columns are what evaluate() gives on each split.
    model = result.protocols[2].models["deformable CNN"]
    row = result.protocols[2].rows[1]
    assert row.occluded_accuracy == evaluate(model, occluded)
    assert row.plain_accuracy == evaluate(model, plain)
    assert result.to_dict()["test_occluded_coverage"] == pytest.approx(0.3, abs=0.03)


def test_protocol3_trains_on_occluded_digits(monkeypatch):
    import deformconv.demo.protocols as protocols

    seen = []
    real = protocols.train

    def spy(model, train_split, val_split, config, augmentation=None, **kwargs):
        seen.append((kwargs["task"], augmentation, val_split))
        return real(model, train_split, val_split, config, augmentation, **kwargs)

    monkeypatch.setattr(protocols, "train", spy)
    occlusion = Occlusion(0.2, "blob")
    run_demo(DemoConfig(**TINY, protocols=(3,), occlusion=occlusion))
    assert [task for task, _, _ in seen] == ["P3 regular CNN", "P3 deformable CNN"]
    assert all(aug == occlusion and val.occluders is not None for _, aug, val in seen)


def test_protocol2_adapts_only_offsets(result):
    p2 = result.protocols[1]
    regular = p2.models["regular CNN (plain)"].state_dict()
    twin = p2.models["deformable: offsets"].state_dict()
    for key, value in twin.items():
        if "conv_offset" not in key:
            assert torch.equal(value, regular[key]), key
    control = p2.models["control: fine-tuned"].state_dict()
    assert any(not torch.equal(control[k], regular[k]) for k in regular)


def test_protocol1_is_reproducible():
    config = DemoConfig(**{**TINY, "epochs": 1}, protocols=(1,), seed=2)
    first = run_demo(config).protocols[0]
    second = run_demo(config).protocols[0]
    for name in ("regular CNN", "deformable CNN"):
        a, b = first.models[name].state_dict(), second.models[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_result_is_json_serialisable(result):
    data = json.loads(json.dumps(result.to_dict()))
    assert data["config"]["deformation"]["scale"] == [0.5, 1.5]
    assert data["config"]["occlusion"] == {
        "fraction": 0.3,
        "shape": "rectangle",
        "fill": 0.5,
        "threshold": 0.25,
    }
    rows = data["protocols"][0]["rows"]
    assert {"plain_accuracy", "deformed_accuracy", "occluded_accuracy", "history"} <= rows[0].keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": "cifar"}, r"data must be one of \('digits', 'mnist'\)"),
        ({"data": "mnist"}, "needs root"),
        ({"protocols": (4,)}, r"protocols must be a non-empty subset of \(1, 2, 3\)"),
        ({"limit": 3}, "limit must be >= 10"),
        ({"deformable": 0}, r"deformable must be in \[1, 3\]"),
        ({"size": 30}, "image_size must be a multiple of 4"),
        ({"digit_size": 40}, r"digit_size must be in \[1, size=32\]"),
        ({"lr": 0.0}, "lr must be a positive finite number"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


def test_digit_side_defaults():
    assert DemoConfig().digit_side() == 20
    assert DemoConfig(data="mnist", root="x").digit_side() == 28
    assert DemoConfig(size=48, digit_size=30).digit_side() == 30
    splits = load_data(DemoConfig(size=16, limit=20))
    assert len(splits.train) == 20 and splits.train.images.shape[-1] == 16
    assert (
        DemoConfig(deformation=Deformation(elastic=1.0)).to_dict()["deformation"]["elastic"] == 1.0
    )
