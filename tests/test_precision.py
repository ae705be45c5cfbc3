"""Backend and precision selection, the bf16 agreement check and its refusal path, batching.

The agreement check runs for real on the trained demo bundle (OpenVINO, a small held-out
phantom split); the selection rules are checked on manifests recording given checks.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_node.imaging import PrepParams, prepare
from spine_node.models.bundle import (
    PrecisionCheck,
    load_manifest,
    manifest_from_json,
    write_manifest,
)
from spine_node.models.runtime import (
    Backend,
    Precision,
    RuntimeChoice,
    choose_runtime,
    cpu_flags,
    has_native_bf16,
)
from spine_node.models.triage import TriageEnsemble
from spine_node.node import demo_bundle_path
from spine_node.pipeline import Cascade, build_backend
from spine_node.results.sr import algorithm_identification
from training.phantom import write_phantom_dataset
from training.precision import check_bundle_precision
from training.vindr import load_records

pytest_plugins = ("tests.fixtures_models",)

ALL = frozenset(Backend)
BF16_CPU = ("avx512f", "avx512_bf16")
OLD_CPU = ("avx2", "avx512f")


def _check(passed: bool, backend: str = "openvino", precision: str = "bf16") -> PrecisionCheck:
    return PrecisionCheck(
        precision=precision,
        backend=backend,
        device="cpu" if precision == "bf16" else "cuda",
        passed=passed,
        n_images=10,
        triage_calls_changed=0 if passed else 1,
        max_member_probability_diff=0.01,
        map50_fp32=0.8,
        map50=0.8,
    )


# ------------------------------------------------------------------------ selection rules


def test_auto_picks_bf16_only_on_a_native_bf16_cpu_with_a_passing_check(tiny_bundle: Path) -> None:
    plain = load_manifest(tiny_bundle)
    checked = replace(plain, precision_checks=(_check(True),))
    choice = choose_runtime(checked, flags=BF16_CPU, installed=ALL)
    assert (choice.backend, choice.precision, choice.refusal) == (Backend.OPENVINO, Precision.BF16, "")
    old = choose_runtime(checked, flags=OLD_CPU, installed=ALL)
    assert (old.backend, old.precision) == (Backend.OPENVINO, Precision.FP32)
    assert "no native bf16" in " ".join(old.reasons)
    # no check recorded: refused, fp32 with the reason
    refused = choose_runtime(plain, flags=BF16_CPU, installed=ALL)
    assert refused.precision is Precision.FP32
    assert "records no agreement check for bf16 on openvino" in refused.refusal
    # a failed check: refused
    failed = choose_runtime(
        replace(plain, precision_checks=(_check(False),)), flags=BF16_CPU, installed=ALL
    )
    assert failed.precision is Precision.FP32
    assert "agreement check failed" in failed.refusal and "1 triage calls changed" in failed.refusal
    # a check of another backend does not count for this one
    torch_only = replace(plain, precision_checks=(_check(True, backend="torch"),))
    assert choose_runtime(torch_only, flags=BF16_CPU, installed=ALL).precision is Precision.FP32
    assert (
        choose_runtime(torch_only, backend="torch", flags=BF16_CPU, installed=ALL).precision
        is Precision.BF16
    )


def test_auto_backend_follows_what_is_installed_and_the_bundle(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    no_ov = frozenset({Backend.TORCH, Backend.ONNXRUNTIME})
    assert choose_runtime(m, precision="fp32", installed=no_ov).backend is Backend.ONNXRUNTIME
    bf16 = replace(m, precision_checks=(_check(True, backend="torch"),))
    picked = choose_runtime(bf16, installed=no_ov, flags=BF16_CPU)
    assert (picked.backend, picked.precision) == (Backend.TORCH, Precision.BF16)
    no_onnx = replace(m, members=tuple(replace(s, onnx=None, onnx_sha256=None) for s in m.members))
    assert choose_runtime(no_onnx, installed=ALL).backend is Backend.TORCH
    with pytest.raises(ValueError, match="needs the bundle's ONNX exports"):
        choose_runtime(no_onnx, backend="openvino", installed=ALL)
    assert choose_runtime(m, backend="onnx", installed=ALL).backend is Backend.ONNXRUNTIME
    ort = choose_runtime(m, backend="onnxruntime", precision="bf16", installed=ALL, flags=BF16_CPU)
    assert ort.precision is Precision.FP32 and "fp32 exports only" in " ".join(ort.reasons)
    with pytest.raises(ValueError, match="fp16"):
        choose_runtime(m, precision="fp16", device="cpu", installed=ALL)
    with pytest.raises(ValueError, match="openvino"):
        choose_runtime(m, backend="openvino", device="cuda", installed=ALL)
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_runtime(m, backend="tensorrt")
    cuda = choose_runtime(
        replace(m, precision_checks=(_check(True, backend="torch", precision="fp16"),)),
        device="cuda:0",
        installed=ALL,
    )
    assert (cuda.backend, cuda.precision, cuda.device_kind) == (Backend.TORCH, Precision.FP16, "cuda")
    assert choose_runtime(m, device="cuda", installed=ALL).precision is Precision.FP32


def test_runtime_choice_and_checks_round_trip_through_json(tiny_bundle: Path) -> None:
    choice = RuntimeChoice(Backend.OPENVINO, Precision.BF16, "cpu", ("a", "b"), "")
    assert RuntimeChoice.from_json(choice.to_json()) == choice
    m = replace(load_manifest(tiny_bundle), precision_checks=(_check(True), _check(False)))
    again = manifest_from_json(m.to_json())
    assert again.precision_checks == m.precision_checks
    found = again.precision_check("bf16", "openvino", "cpu")
    assert found is not None and found.passed is False  # the last one recorded counts


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\n")
    assert has_native_bf16(cpu_flags(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert not has_native_bf16(cpu_flags(info))
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_bf16_without_a_check_is_refused_with_a_log_line(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="spine_node.pipeline"):
        cascade = Cascade.load(tiny_bundle, device="cpu", backend="openvino", precision="bf16")
    assert cascade.model_info.parameters["precision"] == "fp32"
    assert cascade.model_info.parameters["backend"] == "openvino"
    assert any("bf16 refused" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ the agreement check


@pytest.fixture(scope="module")
def checked_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PrecisionCheck]]:
    """A copy of the demo bundle checked on a small held-out phantom split (OpenVINO)."""
    root = tmp_path_factory.mktemp("precision")
    bundle = Path(shutil.copytree(demo_bundle_path(), root / "bundle"))
    # drop checks the committed bundle may carry, so this run's are the ones read back
    write_manifest(bundle, replace(load_manifest(bundle), precision_checks=()))
    phantom = root / "phantom"
    write_phantom_dataset(
        phantom, n_images=20, seed=1313, balanced=True, size=(512, 384), test_fraction=0.5
    )
    checks = check_bundle_precision(bundle, phantom, backends=[Backend.OPENVINO])
    return bundle, checks


def test_agreement_check_is_recorded_and_consistent(
    checked_demo: tuple[Path, list[PrecisionCheck]],
) -> None:
    bundle, checks = checked_demo
    (check,) = checks
    assert (check.precision, check.backend, check.device) == ("bf16", "openvino", "cpu")
    assert check.n_images == len(load_records(bundle.parent / "phantom", "test")) >= 5
    assert check.map50 is not None and check.map50_fp32 is not None
    delta = check.map50_delta
    assert delta is not None
    assert check.passed == (
        check.triage_calls_changed == 0
        and check.max_member_probability_diff <= 0.02
        and delta <= 0.01
    )
    assert check.max_member_probability_diff < 0.1
    if has_native_bf16(cpu_flags()):  # elsewhere OpenVINO may keep f32 whatever the hint
        assert check.max_member_probability_diff > 0  # bf16 really ran
    assert load_manifest(bundle).precision_check("bf16", "openvino", "cpu") == check


def test_node_runs_bf16_after_a_passing_check_and_says_so_in_the_sr(
    checked_demo: tuple[Path, list[PrecisionCheck]],
    dx_dataset: Callable[..., pydicom.Dataset],
) -> None:
    bundle, (check,) = checked_demo
    cascade = Cascade.load(bundle, device="cpu", backend="auto", precision="auto")
    expect = "bf16" if check.passed and has_native_bf16(cpu_flags()) else "fp32"
    assert cascade.model_info.parameters["precision"] == expect
    assert cascade.model_info.parameters["backend"] == "openvino"
    algorithm = algorithm_identification(cascade.model_info, "test")
    texts = [getattr(item, "TextValue", "") for item in algorithm]
    assert f'precision="{expect}"' in texts or f"precision={expect}" in texts, texts
    assert any(t.startswith("backend=") and "openvino" in t for t in texts), texts
    results = cascade.analyze([dx_dataset(seed=7)])
    assert len(results) == 1 and results[0].sop_instance_uid


# ------------------------------------------------------------------------ batching


@pytest.mark.parametrize("backend", [Backend.TORCH, Backend.OPENVINO])
def test_batched_images_score_as_single_images(
    tiny_bundle: Path, backend: Backend, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    manifest = load_manifest(tiny_bundle)
    params = PrepParams(**dict(manifest.prep))
    prepared = [prepare(dx_dataset(seed=s), params) for s in (21, 22, 23)]
    images = np.stack([p.triage for p in prepared]).astype(np.float32)
    runner, _ = build_backend(RuntimeChoice(backend, Precision.FP32, "cpu"), tiny_bundle, manifest)
    calls: list[int] = []

    class Counting:
        names = runner.names

        def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
            calls.append(batch.shape[0])
            return runner.run(batch)

    ensemble = TriageEnsemble(Counting(), manifest.ensemble_weights, manifest.tta_views)
    together = ensemble(images)
    assert calls == [3 * manifest.tta_views]  # one forward: 3 images x TTA views, every member
    alone = [ensemble(images[i : i + 1]) for i in range(3)]
    for i, one in enumerate(alone):
        assert together.scores[i] == pytest.approx(one.scores[0], abs=1e-4)
        for name in together.member_probs:
            assert together.member_probs[name][i] == pytest.approx(
                one.member_probs[name][0], abs=1e-4
            )
        np.testing.assert_allclose(together.embeddings[i], one.embeddings[0], atol=1e-3)


def test_torch_backend_runs_bf16_autocast_and_refuses_fp16_on_the_cpu(tiny_bundle: Path) -> None:
    import torch

    from spine_node.models.backend_torch import TorchMembers
    from spine_node.models.triage import load_member

    manifest = load_manifest(tiny_bundle)
    members = {m.name: load_member(m, tiny_bundle) for m in manifest.members}
    batch = np.random.default_rng(3).random((4, 1, 64, 64), dtype=np.float32)
    fp32 = TorchMembers(members, torch.device("cpu"), Precision.FP32).run(batch)
    bf16 = TorchMembers(members, torch.device("cpu"), Precision.BF16).run(batch)
    assert TorchMembers(members, torch.device("cpu")).channels_last  # the CPU's fast layout
    for (l32, e32), (l16, e16) in zip(fp32, bf16, strict=True):
        assert l16.dtype == np.float32 and e16.shape == e32.shape
        assert not np.array_equal(l16, l32)  # bf16 arithmetic really ran
        np.testing.assert_allclose(1 / (1 + np.exp(-l16)), 1 / (1 + np.exp(-l32)), atol=0.05)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        TorchMembers(members, torch.device("cpu"), Precision.FP16)


def test_worker_batch_is_one_forward_per_member_and_scores_as_single_images(
    tmp_path: Path, tiny_bundle: Path, dx_dataset: Callable[..., pydicom.Dataset]
) -> None:
    from spine_node.node import build_worker, load_cascade, open_store, prepare_data_dir
    from spine_node.results.types import ResultRecord
    from spine_node.spool import relative_name, write_durable
    from spine_node.store import InstanceRecord
    from tests.nodekit import node_settings

    settings = node_settings(
        tmp_path, bundle=str(tiny_bundle), device="cpu", decode_isolation=False,
        worker_batch_size=3, backend="openvino", precision="fp32",
    )  # fmt: skip
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        cascade = load_cascade(settings)
        runner = cascade.triage.runner
        forwards: list[int] = []

        class Counting:
            names = runner.names

            def run(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
                forwards.append(batch.shape[0])
                return runner.run(batch)

        cascade.triage.runner = Counting()
        datasets = [dx_dataset(seed=s) for s in (31, 32, 33)]
        for ds in datasets:
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            rel = relative_name(str(ds.SOPInstanceUID))
            write_durable(settings.spool_dir, rel, path.read_bytes())
            store.receive(InstanceRecord(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                         str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                         "1.2.840.10008.1.2.1", "MODALITY1", rel,
                                         path.stat().st_size))  # fmt: skip
        worker = build_worker(settings, store, cascade)
        assert worker.run_once() == 3  # the three queued images claimed together
        views = cascade.manifest.tta_views
        assert forwards == [3 * views]  # one forward per member: 3 images x TTA views
        assert all(store.job_state(str(ds.SOPInstanceUID)) == "done" for ds in datasets)
        for ds in datasets:  # the same scores as each image alone
            (alone,) = cascade.analyze([ds])
            ((_, payload),) = [
                (u, p) for u, p in store.study_results(str(ds.StudyInstanceUID))
                if u == str(ds.SOPInstanceUID)
            ]
            record = ResultRecord.from_json(payload)
            assert alone.score is not None
            assert record.result.score == pytest.approx(alone.score, abs=1e-4)
    finally:
        store.close()
