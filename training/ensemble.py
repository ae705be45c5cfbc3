"""Ensemble weights and decision threshold, fitted on validation predictions made as the bundle serves.

The triage score is ``sum_i w_i p_i``. The weights are found by an exhaustive grid search in
0.05 steps over weights that sum to 1, maximising AUROC; the threshold is the one maximising
Youden's J (sensitivity + specificity - 1) of the weighted score. Both are fitted on validation
predictions; a test split is refused (:class:`TestSplitError`).

``spine-train ensemble --member DIR... --fold K --tta N --data ROOT`` (the default way) fits on
predictions made the way a bundle serves: the shipped fold-K models themselves, on fold K's
validation images (the ids of each member's ``oof_foldK.csv``), prepared by the node's own
preparation and averaged over the same ``N`` TTA views by the node's own
:class:`spine_node.models.triage.TriageEnsemble`. The fit records this in ``fitted_on``;
``spine-train bundle`` refuses a fit whose fold, TTA or members differ from what it ships, and
records ``fitted_on`` in the manifest (``metrics.ensemble_fit``).

``--oof DIR...`` fits on the pooled out-of-fold CSVs of every fold's model without TTA
(``image_id,score,label[,fold]``, as ``train_classifier`` writes them): a diagnostic only,
marked ``pooled_oof``; no bundle is built from it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from spine_node.drift import score_reference

logger = logging.getLogger(__name__)

__all__ = [
    "FITTED_ON_POOLED",
    "FITTED_ON_SERVED",
    "EnsembleFit",
    "OofPredictions",
    "TestSplitError",
    "add_arguments",
    "check_not_test",
    "fit_ensemble",
    "grid_search_weights",
    "load_member_dir",
    "load_oof",
    "run",
    "served_predictions",
    "weight_grid",
    "youden_threshold",
]


#: ``fitted_on.kind`` of a fit on the shipped models' own TTA predictions (what bundles need).
FITTED_ON_SERVED = "served"
#: ``fitted_on.kind`` of a fit on pooled out-of-fold predictions without TTA (diagnostic).
FITTED_ON_POOLED = "pooled_oof"


class TestSplitError(ValueError):
    """Raised when test-set predictions are offered for fitting weights or thresholds."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class OofPredictions:
    """Aligned out-of-fold predictions of several members.

    Attributes
    ----------
    members : tuple of str
        Member names, column order of ``scores``.
    image_ids : tuple of str
        Row order.
    scores : numpy.ndarray
        ``(n_images, n_members)`` probabilities.
    labels : numpy.ndarray
        ``(n_images,)`` 0/1 (1 = abnormal).
    """

    members: tuple[str, ...]
    image_ids: tuple[str, ...]
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.image_ids), len(self.members)):
            raise ValueError(
                f"scores must have shape {(len(self.image_ids), len(self.members))}, got {self.scores.shape}"
            )
        if self.labels.shape != (len(self.image_ids),):
            raise ValueError(
                f"labels must have shape {(len(self.image_ids),)}, got {self.labels.shape}"
            )


@dataclass(frozen=True)
class EnsembleFit:
    """Result of :func:`fit_ensemble` (JSON-serialisable through ``asdict``)."""

    members: tuple[str, ...]
    weights: tuple[float, ...]
    threshold: float
    auroc: float
    member_auroc: tuple[float, ...]
    sensitivity: float
    specificity: float
    n_images: int
    n_abnormal: int
    #: The weighted score's distribution on these predictions (``ScoreReference.to_json``),
    #: the bundle's drift reference (``spine-train bundle`` records it in the manifest).
    score_reference: dict[str, Any] | None = None


def weight_grid(n_members: int, step: float = 0.05) -> Iterator[tuple[float, ...]]:
    """All weight vectors with entries in multiples of ``step`` that sum to 1.

    Parameters
    ----------
    n_members : int
        Number of members (>= 1).
    step : float
        Grid step; ``1/step`` must be an integer.

    Yields
    ------
    tuple of float
        One weight vector, in lexicographic order of the integer compositions.
    """
    if n_members < 1:
        raise ValueError(f"n_members must be >= 1, got {n_members!r}")
    units = round(1.0 / step)
    if units < 1 or abs(units * step - 1.0) > 1e-9:
        raise ValueError(f"1/step must be a positive integer, got step={step!r}")
    for cuts in itertools.combinations(range(units + n_members - 1), n_members - 1):
        parts = []
        prev = -1
        for c in (*cuts, units + n_members - 1):
            parts.append(c - prev - 1)
            prev = c
        yield tuple(round(p * step, 10) for p in parts)


def grid_search_weights(
    scores: np.ndarray, labels: np.ndarray, *, step: float = 0.05
) -> tuple[tuple[float, ...], float]:
    """Weights (0.05 grid, sum 1) maximising the AUROC of the weighted score.

    Ties are broken towards the most even weights (smallest sum of squares), then grid order.

    Parameters
    ----------
    scores : numpy.ndarray
        ``(n_images, n_members)`` member probabilities.
    labels : numpy.ndarray
        ``(n_images,)`` 0/1 labels; both classes must be present.
    step : float
        Grid step.

    Returns
    -------
    (tuple of float, float)
        Best weights and their AUROC.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"scores must be (n_images, n_members) matching labels, got {scores.shape}"
        )
    if len(np.unique(labels)) != 2:
        raise ValueError("labels must contain both normal (0) and abnormal (1) images")
    best: tuple[float, float, tuple[float, ...]] | None = None
    for w in weight_grid(scores.shape[1], step):
        auc = float(roc_auc_score(labels, scores @ np.asarray(w)))
        key = (round(auc, 12), -float(np.sum(np.square(w))))
        if best is None or key > best[:2]:
            best = (key[0], key[1], w)
    if best is None:  # pragma: no cover - the grid is never empty
        raise ValueError("empty weight grid")
    return best[2], best[0]


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Threshold maximising Youden's J; an image is positive when ``score >= threshold``.

    Parameters
    ----------
    scores : numpy.ndarray
        ``(n_images,)`` scores.
    labels : numpy.ndarray
        ``(n_images,)`` 0/1 labels; both classes must be present.

    Returns
    -------
    (float, float, float)
        Threshold, sensitivity and specificity at it.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(int).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must match, got {scores.shape} and {labels.shape}")
    if len(np.unique(labels)) != 2:
        raise ValueError("labels must contain both normal (0) and abnormal (1) images")
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    j = np.where(finite, tpr - fpr, -np.inf)
    i = int(np.argmax(j))
    return float(min(thresholds[i], 1.0)), float(tpr[i]), float(1.0 - fpr[i])


def fit_ensemble(oof: OofPredictions, *, step: float = 0.05) -> EnsembleFit:
    """Grid-search weights on ``oof`` and fit the Youden threshold of the weighted score.

    Parameters
    ----------
    oof : OofPredictions
        Validation (out-of-fold) predictions.
    step : float
        Weight grid step.

    Returns
    -------
    EnsembleFit
    """
    weights, auc = grid_search_weights(oof.scores, oof.labels, step=step)
    combined = oof.scores @ np.asarray(weights)
    thr, sens, spec = youden_threshold(combined, oof.labels)
    member_auc = tuple(
        float(roc_auc_score(oof.labels, oof.scores[:, i])) for i in range(len(oof.members))
    )
    return EnsembleFit(
        members=oof.members,
        weights=weights,
        threshold=thr,
        auroc=auc,
        member_auroc=member_auc,
        sensitivity=sens,
        specificity=spec,
        n_images=len(oof.image_ids),
        n_abnormal=int(oof.labels.sum()),
        score_reference=score_reference(
            np.clip(combined, 0.0, 1.0),
            threshold=thr,
            source=f"out-of-fold validation predictions ({len(oof.image_ids)} images)",
        ).to_json(),
    )


# --------------------------------------------------------------------------- files


def _read_oof_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"image_id", "score", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns image_id,score,label, got {sorted(rows[0])}")
    return rows


def _oof_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("oof_fold*.csv"))
        if not files:
            raise FileNotFoundError(
                f"{path}: no oof_fold*.csv files (run spine-train classifier first)"
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [path]


def _test_ids(data_dir: Path | None) -> set[str]:
    if data_dir is None:
        return set()
    test_csv = data_dir / "annotations" / "test.csv"
    if not test_csv.is_file():
        return set()
    with test_csv.open(newline="") as fh:
        return {row["image_id"] for row in csv.DictReader(fh)}


def check_not_test(
    files: Sequence[Path], rows: Sequence[Mapping[str, str]], test_ids: set[str]
) -> None:
    """Refuse predictions that come from, or contain, the test split.

    Raises
    ------
    TestSplitError
        When a file name says ``test``, a row has ``split == test``, or an image id is in
        ``annotations/test.csv``.
    """
    for f in files:
        if "test" in f.name.lower():
            raise TestSplitError(
                f"{f}: looks like test-set predictions; weights and threshold are fitted on "
                "validation (out-of-fold) predictions only, never on test"
            )
    for row in rows:
        if row.get("split", "").strip().lower() == "test":
            raise TestSplitError(
                "predictions flagged split=test; weights and threshold are fitted on validation "
                "(out-of-fold) predictions only, never on test"
            )
    if test_ids:
        leaked = {row["image_id"] for row in rows} & test_ids
        if leaked:
            raise TestSplitError(
                f"{len(leaked)} image(s) are in annotations/test.csv; weights and threshold are "
                "fitted on validation (out-of-fold) predictions only, never on test"
            )


def load_oof(sources: Mapping[str, Path], *, data_dir: Path | None = None) -> OofPredictions:
    """Read and align each member's out-of-fold predictions.

    Parameters
    ----------
    sources : mapping of str to pathlib.Path
        Member name -> directory of ``oof_fold*.csv`` files (or one CSV file).
    data_dir : pathlib.Path, optional
        VinDr-layout dataset root; its ``annotations/test.csv`` ids are refused.

    Returns
    -------
    OofPredictions
        Images present for every member, sorted by image id.
    """
    if not sources:
        raise ValueError("sources must name at least one member")
    test_ids = _test_ids(data_dir)
    per_member: dict[str, dict[str, float]] = {}
    labels: dict[str, int] = {}
    for name, path in sources.items():
        files = _oof_files(Path(path))
        rows = [r for f in files for r in _read_oof_csv(f)]
        check_not_test(files, rows, test_ids)
        scores: dict[str, float] = {}
        for r in rows:
            iid = r["image_id"]
            if iid in scores:
                raise ValueError(f"member {name!r}: image {iid} appears in more than one fold")
            scores[iid] = float(r["score"])
            lab = int(float(r["label"]))
            if labels.setdefault(iid, lab) != lab:
                raise ValueError(f"image {iid}: members disagree on its label")
        per_member[name] = scores
    common = sorted(set.intersection(*(set(s) for s in per_member.values())))
    if not common:
        raise ValueError("the members' out-of-fold predictions share no image")
    union = set.union(*(set(s) for s in per_member.values()))
    if len(union) != len(common):
        logger.warning(
            "%d images lack a prediction from some member; using %d",
            len(union) - len(common),
            len(common),
        )
    members = tuple(per_member)
    scores_arr = np.array([[per_member[m][i] for m in members] for i in common], dtype=np.float64)
    return OofPredictions(
        members=members,
        image_ids=tuple(common),
        scores=scores_arr,
        labels=np.array([labels[i] for i in common], dtype=np.int64),
    )


def parse_sources(values: Sequence[str]) -> dict[str, Path]:
    """Parse ``NAME=PATH`` or ``PATH`` (name = directory name) arguments."""
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        p = Path(path if sep else v)
        key = name if sep else p.name
        if key in out:
            raise ValueError(f"member name {key!r} given twice; use NAME=DIR")
        out[key] = p
    return out


# --------------------------------------------------------------------------- served


def load_member_dir(directory: Path, fold: int) -> tuple[Any, Path]:
    """The ``MemberSpec`` and fold-``fold`` weights file of a classifier output directory.

    Parameters
    ----------
    directory : pathlib.Path
        ``spine-train classifier --out`` directory (``member.json``, ``foldK/best.pt``).
    fold : int
        Which fold's model.

    Returns
    -------
    (MemberSpec, pathlib.Path)

    Raises
    ------
    FileNotFoundError
        When ``member.json`` or the fold's ``best.pt`` is missing.
    """
    from training.train_classifier import AugmentParams, ClassifierConfig, member_spec

    directory = Path(directory)
    info_path = directory / "member.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: not a spine-train classifier output directory")
    info = json.loads(info_path.read_text())
    cfg_doc = dict(info["config"])
    known = set(ClassifierConfig.__dataclass_fields__)
    cfg_doc = {k: v for k, v in cfg_doc.items() if k in known}
    if isinstance(cfg_doc.get("augment"), Mapping):
        aug = dict(cfg_doc["augment"])
        aug_known = set(AugmentParams.__dataclass_fields__)
        aug = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in aug.items() if k in aug_known
        }
        cfg_doc["augment"] = AugmentParams(**aug)
    cfg = ClassifierConfig(**cfg_doc)
    weights = directory / f"fold{fold}" / "best.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: fold {fold} of member {cfg.name} was not trained")
    return member_spec(cfg), weights


def _fold_validation_ids(directory: Path, fold: int) -> list[str]:
    path = Path(directory) / f"oof_fold{fold}.csv"
    if not path.is_file():
        path = Path(directory) / f"fold{fold}" / f"oof_fold{fold}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no oof_fold{fold}.csv naming fold {fold}'s validation images"
        )
    return [r["image_id"] for r in _read_oof_csv(path)]


def served_predictions(
    member_dirs: Sequence[Path],
    *,
    fold: int,
    data_dir: Path,
    tta_views: int,
    device: str = "cpu",
    batch_size: int = 16,
) -> tuple[OofPredictions, dict[str, Any]]:
    """Fold ``fold``'s validation predictions of the shipped fold-``fold`` models, with TTA.

    Images are prepared by :func:`spine_node.imaging.prepare` and scored by
    :class:`spine_node.models.triage.TriageEnsemble` with ``tta_views`` views, exactly as the
    node scores a received image.

    Parameters
    ----------
    member_dirs : sequence of pathlib.Path
        Classifier output directories, in ensemble order.
    fold : int
        The fold whose models the bundle ships.
    data_dir : pathlib.Path
        VinDr-layout data root (``annotations/train.csv``); test ids are refused.
    tta_views : int
        TTA views the bundle serves with (1-5).
    device : str
        ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Images per forward pass (times ``tta_views`` views).

    Returns
    -------
    (OofPredictions, dict)
        The predictions and the ``fitted_on`` record.
    """
    import torch

    from spine_node.imaging import PrepParams, prepare, read_dataset
    from spine_node.models.bundle import sha256_file
    from spine_node.models.triage import (
        TorchMembers,
        TriageEnsemble,
        TriageMember,
        create_member,
        read_state_dict,
    )
    from training import vindr

    if not member_dirs:
        raise ValueError("member_dirs must name at least one classifier output directory")
    loaded = [load_member_dir(Path(d), fold) for d in member_dirs]
    names = tuple(spec.name for spec, _ in loaded)
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be distinct, got {names}")
    sizes = {spec.input_size for spec, _ in loaded}
    if len(sizes) != 1:
        raise ValueError(f"members must share one input size, got {sorted(sizes)}")
    ids = _fold_validation_ids(Path(member_dirs[0]), fold)
    for d in member_dirs[1:]:
        if set(_fold_validation_ids(Path(d), fold)) != set(ids):
            raise ValueError(
                f"{d}: fold {fold}'s validation images differ from {member_dirs[0]}'s "
                "(members trained on different splits)"
            )
    records = {r.image_id: r for r in vindr.load_records(Path(data_dir), "train")}
    check_not_test([], [{"image_id": i} for i in ids], _test_ids(Path(data_dir)))
    unknown = [i for i in ids if i not in records]
    if unknown:
        raise ValueError(
            f"{len(unknown)} validation images are not in train.csv, e.g. {unknown[0]}"
        )
    dev = torch.device(device)
    wrapped = {}
    for spec, weights in loaded:
        model = create_member(spec)
        model.load_state_dict(read_state_dict(weights), strict=True)
        wrapped[spec.name] = TriageMember(model, spec.mean, spec.std).eval()
    ensemble = TriageEnsemble(
        TorchMembers(wrapped, dev), [1.0 / len(names)] * len(names), tta_views
    )
    params = PrepParams(triage_size=sizes.pop())
    probs: list[np.ndarray] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        images = np.stack(
            [prepare(read_dataset(records[i].path), params).triage for i in chunk]
        ).astype(np.float32)
        out = ensemble(images)
        probs.append(np.stack([np.asarray(out.member_probs[n]) for n in names], axis=1))
    oof = OofPredictions(
        members=names,
        image_ids=tuple(ids),
        scores=np.concatenate(probs).astype(np.float64),
        labels=np.array([records[i].label for i in ids], dtype=np.int64),
    )
    fitted_on = {
        "kind": FITTED_ON_SERVED,
        "description": (
            f"fold {fold} validation images ({len(ids)}), the shipped fold-{fold} models, "
            f"{tta_views}-view TTA, the node's preparation and ensemble"
        ),
        "fold": fold,
        "tta_views": tta_views,
        "members": list(names),
        "weights_sha256": {spec.name: sha256_file(w) for spec, w in loaded},
        "n_images": len(ids),
    }
    return oof, fitted_on


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spine-train ensemble`` arguments."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--member",
        nargs="+",
        metavar="DIR",
        help="classifier output directories, in ensemble order: fit on the shipped fold's own "
        "validation predictions with TTA (what a bundle needs)",
    )
    source.add_argument(
        "--oof",
        nargs="+",
        metavar="[NAME=]DIR",
        help="diagnostic: pooled out-of-fold CSVs of every fold without TTA (no bundle is "
        "built from such a fit)",
    )
    parser.add_argument(
        "--data", type=Path, help="dataset root: ids in annotations/test.csv are refused"
    )
    parser.add_argument(
        "--fold", type=int, default=0, help="with --member: the fold the bundle ships (default 0)"
    )
    parser.add_argument(
        "--tta", type=int, default=5, help="with --member: TTA views the bundle serves (default 5)"
    )
    parser.add_argument("--device", default="cpu", help="with --member: cpu or cuda")
    parser.add_argument("--step", type=float, default=0.05, help="weight grid step (default 0.05)")
    parser.add_argument("--out", type=Path, help="write the fit as JSON here")


def run(args: argparse.Namespace) -> int:
    """Run ``spine-train ensemble``; returns the exit status (2 for a refused test split)."""
    try:
        if args.member:
            if args.data is None:
                print("spine-train ensemble: --member needs --data", file=sys.stderr)
                return 2
            oof, fitted_on = served_predictions(
                [Path(d) for d in args.member],
                fold=args.fold,
                data_dir=args.data,
                tta_views=args.tta,
                device=args.device,
            )
        else:
            oof = load_oof(parse_sources(args.oof), data_dir=args.data)
            fitted_on = {
                "kind": FITTED_ON_POOLED,
                "description": "pooled out-of-fold predictions of every fold's model, without "
                "TTA (diagnostic; not how a bundle serves)",
                "n_images": len(oof.image_ids),
            }
    except TestSplitError as exc:
        print(f"spine-train ensemble: refused: {exc}")
        return 2
    fit = fit_ensemble(oof, step=args.step)
    text = json.dumps({**asdict(fit), "fitted_on": fitted_on}, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
