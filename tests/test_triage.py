"""Triage ensemble: TTA views, one batch per member, weighted soft vote, local weights only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from spine_node.models.bundle import MemberSpec, load_manifest
from spine_node.models.triage import (
    TorchMembers,
    TriageEnsemble,
    TriageMember,
    create_member,
    load_member,
    tta_views,
)

pytest_plugins = ("tests.fixtures_models",)


@pytest.fixture()
def members(tiny_bundle: Path) -> TorchMembers:
    torch.set_num_threads(1)
    m = load_manifest(tiny_bundle)
    return TorchMembers(
        {s.name: load_member(s, tiny_bundle) for s in m.members}, torch.device("cpu")
    )


class CountingRunner:
    """Wraps a runner and records the batch sizes it is given."""

    def __init__(self, inner: TorchMembers) -> None:
        self.inner = inner
        self.names = inner.names
        self.batches: list[int] = []

    def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        self.batches.append(batch.shape[0])
        return self.inner.run(batch)


def test_tta_views_are_the_documented_views(spine_like: Callable[..., np.ndarray]) -> None:
    img = spine_like(64, 64)
    v = tta_views(img, 5)
    assert v.shape == (5, 64, 64) and v.dtype == np.float32
    np.testing.assert_array_equal(v[0], img)
    np.testing.assert_array_equal(v[1], img[:, ::-1])
    np.testing.assert_allclose(v[4], img**0.8, rtol=1e-5)
    assert v.min() >= 0.0 and v.max() <= 1.0
    for k in (2, 3):  # rotation and zoom: mild, but real changes
        diff = np.abs(v[k] - img).mean()
        assert 0.001 < diff < 0.2
    np.testing.assert_array_equal(tta_views(img, 2), v[:2])
    with pytest.raises(ValueError, match="n must be"):
        tta_views(img, 6)
    with pytest.raises(ValueError, match="image must be a 2-D array"):
        tta_views(img[None], 2)


def test_tta_batch_equals_per_view_runs(
    members: TorchMembers, tiny_bundle: Path, spine_like: Callable[..., np.ndarray]
) -> None:
    m = load_manifest(tiny_bundle)
    images = np.stack([spine_like(64, 64, seed=s) for s in (1, 2, 3)])
    runner = CountingRunner(members)
    out = TriageEnsemble(runner, m.ensemble_weights, 5)(images)
    assert runner.batches == [15]  # images x views, one pass per member
    for i, img in enumerate(images):
        per_member = []
        for k, name in enumerate(members.names):
            probs = []
            for view in tta_views(img, 5):
                logit, _ = members.run(view[None, None])[k]
                probs.append(1.0 / (1.0 + np.exp(-float(logit[0]))))
            per_member.append(np.mean(probs))
            assert out.member_probs[name][i] == pytest.approx(per_member[-1], abs=1e-5)
        expected = float(np.dot(m.ensemble_weights, per_member))
        assert out.scores[i] == pytest.approx(expected, abs=1e-5)


def test_batches_never_split_an_image(
    members: TorchMembers, tiny_bundle: Path, spine_like: Callable[..., np.ndarray]
) -> None:
    m = load_manifest(tiny_bundle)
    images = np.stack([spine_like(64, 64, seed=s) for s in (1, 2, 3)])
    runner = CountingRunner(members)
    small = TriageEnsemble(runner, m.ensemble_weights, 5, max_batch=12)(images)
    assert runner.batches == [10, 5]
    whole = TriageEnsemble(members, m.ensemble_weights, 5)(images)
    np.testing.assert_allclose(small.scores, whole.scores, atol=1e-6)
    np.testing.assert_allclose(small.embeddings, whole.embeddings, atol=1e-5)


def test_embeddings_are_the_identity_view(
    members: TorchMembers, tiny_bundle: Path, spine_like: Callable[..., np.ndarray]
) -> None:
    m = load_manifest(tiny_bundle)
    images = np.stack([spine_like(64, 64, seed=s) for s in (4, 5)])
    ens = TriageEnsemble(members, m.ensemble_weights, 5)
    out = ens(images)
    emb = ens.embed(images)
    widths = [e.shape[1] for _, e in members.run(images[:1, None])]
    assert emb.shape == (2, sum(widths))
    np.testing.assert_allclose(out.embeddings, emb, atol=1e-5)


def test_member_normalises_inside(tiny_bundle: Path) -> None:
    spec = next(s for s in load_manifest(tiny_bundle).members if s.name == "efficientnet")
    member = load_member(spec, tiny_bundle)
    x = torch.full((1, 1, 8, 8), 0.75)
    np.testing.assert_allclose(member.normalise(x).numpy(), 0.5)  # (0.75 - 0.5) / 0.5
    assert not member.training


def test_pretrained_file_skips_the_classifier(tiny_bundle: Path, tmp_path: Path) -> None:
    spec = next(s for s in load_manifest(tiny_bundle).members if s.name == "resnet")
    imagenet: Any = timm.create_model(
        spec.arch, pretrained=False, num_classes=1000, **dict(spec.kwargs)
    )
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet.state_dict(), path)
    model: Any = create_member(spec, pretrained_file=path)
    assert model.get_classifier().out_features == 1
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight)
    wrong = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(wrong.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit resnet50"):
        create_member(spec, pretrained_file=path)


def test_member_kwargs_may_not_override_the_convention(tiny_bundle: Path) -> None:
    from dataclasses import replace

    spec = load_manifest(tiny_bundle).members[0]
    with pytest.raises(ValueError, match="in_chans"):
        create_member(replace(spec, kwargs={**spec.kwargs, "in_chans": 1}))


@pytest.mark.parametrize(
    ("arch", "mean"),
    [
        ("densenet121", (0.485, 0.456, 0.406)),
        ("tf_efficientnetv2_s", (0.5, 0.5, 0.5)),
        ("resnet50", (0.485, 0.456, 0.406)),
    ],
)
def test_real_members_build_offline_with_their_own_normalisation(arch: str, mean: tuple) -> None:
    from training.export import pretrained_norm

    got_mean, got_std = pretrained_norm(arch)
    assert got_mean == pytest.approx(mean)
    spec = MemberSpec(
        name=arch,
        arch=arch,
        kwargs={},
        weights="w.pt",
        sha256="0" * 64,
        input_size=384,
        mean=got_mean,  # type: ignore[arg-type]
        std=got_std,  # type: ignore[arg-type]
    )
    model: Any = create_member(spec)
    assert model.num_classes == 1
    assert model.get_classifier().out_features == 1


def test_member_forward_shapes(tiny_bundle: Path) -> None:
    spec = load_manifest(tiny_bundle).members[0]
    member = TriageMember(create_member(spec), spec.mean, spec.std).eval()
    with torch.inference_mode():
        logit, emb = member(torch.rand(3, 1, 64, 64))
    assert logit.shape == (3,) and emb.shape[0] == 3 and emb.ndim == 2
