"""Read VinDr-SpineXR's layout (the real data set or the phantom) into typed records.

Layout::

    ROOT/annotations/train.csv   study_id,series_id,image_id,rad_id,lesion_type,xmin,ymin,xmax,ymax
    ROOT/annotations/test.csv
    ROOT/train_images/<image_id>.dicom
    ROOT/test_images/<image_id>.dicom

An image is abnormal when any of its rows names a lesion other than ``No finding``. Boxes are
kept exactly as annotated (several radiologists' boxes of the same lesion are all kept).

Also here: study-level stratified k-fold splits, a torch ``Dataset`` for the triage
classifier (images go through :func:`spine_node.imaging.prepare`, cached as ``.npy``), and a
converter to the Ultralytics YOLO data set layout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spine_node.imaging import Letterbox, PreparedImage, PrepParams, prepare, read_dataset
from spine_node.labels import LESION_LABELS, NO_FINDING
from training.phantom import CSV_COLUMNS

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")
REQUIRED_COLUMNS: tuple[str, ...] = CSV_COLUMNS  # VinDr-SpineXR's annotation columns


@dataclass(frozen=True)
class Box:
    """One annotated lesion box in source-image pixels (column, row)."""

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    rad_id: str = ""

    def __post_init__(self) -> None:
        if self.label not in LESION_LABELS:
            raise ValueError(f"Box label must be one of {LESION_LABELS}, got {self.label!r}")
        values = (self.xmin, self.ymin, self.xmax, self.ymax)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"Box coordinates must be finite, got {values!r}")
        if self.xmax < self.xmin or self.ymax < self.ymin:
            raise ValueError(f"Box must have xmax >= xmin and ymax >= ymin, got {values!r}")

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)``."""
        return (self.xmin, self.ymin, self.xmax, self.ymax)


@dataclass(frozen=True)
class ImageRecord:
    """One image of the data set with all its annotations."""

    image_id: str
    study_id: str
    split: str
    path: Path
    abnormal: bool
    boxes: tuple[Box, ...] = ()
    series_id: str = ""

    def __post_init__(self) -> None:
        if not self.image_id:
            raise ValueError("ImageRecord image_id must not be empty")
        if not self.study_id:
            raise ValueError(f"ImageRecord study_id must not be empty (image {self.image_id})")
        if self.boxes and not self.abnormal:
            raise ValueError(f"ImageRecord {self.image_id} has boxes but is not abnormal")

    @property
    def label(self) -> int:
        """1 for abnormal, 0 for normal."""
        return int(self.abnormal)


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise ValueError(f"{what} must be a number, got {text!r}") from exc


def read_annotations(
    csv_path: str | os.PathLike[str],
    split: str,
    images_dir: str | os.PathLike[str] | None = None,
) -> list[ImageRecord]:
    """Read one VinDr annotation CSV into records (one per image, in first-seen order).

    Parameters
    ----------
    csv_path : path
        ``train.csv`` or ``test.csv``.
    split : str
        ``"train"`` or ``"test"`` (recorded on every record).
    images_dir : path, optional
        Folder of ``<image_id>.dicom`` files; defaults to ``<root>/<split>_images`` next to
        the ``annotations`` folder.

    Returns
    -------
    list of ImageRecord
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(csv_path)
    folder = Path(images_dir) if images_dir is not None else path.parent.parent / f"{split}_images"
    rows_by_image: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}")
        for line, row in enumerate(reader, start=2):
            image_id = (row["image_id"] or "").strip()
            if not image_id:
                raise ValueError(f"{path}:{line}: empty image_id")
            row["_line"] = str(line)
            rows_by_image[image_id].append(row)
    records = []
    for image_id, rows in rows_by_image.items():
        study_ids = {r["study_id"].strip() for r in rows}
        if len(study_ids) != 1:
            raise ValueError(f"{path}: image {image_id} belongs to several studies {study_ids}")
        boxes = []
        abnormal = False
        for r in rows:
            label = r["lesion_type"].strip()
            if label == NO_FINDING:
                continue
            where = f"{path}:{r['_line']}"
            if label not in LESION_LABELS:
                raise ValueError(f"{where}: unknown lesion_type {label!r}")
            abnormal = True
            coords = [r[k].strip() for k in ("xmin", "ymin", "xmax", "ymax")]
            if all(coords):
                x0, y0, x1, y1 = (_float(c, f"{where} coordinate") for c in coords)
                boxes.append(Box(label, x0, y0, x1, y1, rad_id=r["rad_id"].strip()))
            else:
                logger.warning("%s: %s row without a box", where, label)
        records.append(
            ImageRecord(
                image_id=image_id,
                study_id=study_ids.pop(),
                split=split,
                path=folder / f"{image_id}.dicom",
                abnormal=abnormal,
                boxes=tuple(boxes),
                series_id=rows[0]["series_id"].strip(),
            )
        )
    return records


def load_records(root: str | os.PathLike[str], split: str) -> list[ImageRecord]:
    """Read ``ROOT/annotations/<split>.csv`` (images in ``ROOT/<split>_images``).

    Parameters
    ----------
    root : path
        Data set root.
    split : str
        ``"train"`` or ``"test"``.

    Returns
    -------
    list of ImageRecord
    """
    base = Path(root)
    return read_annotations(base / "annotations" / f"{split}.csv", split, base / f"{split}_images")


def study_stratified_kfold(
    records: Sequence[ImageRecord], k: int = 5, seed: int = 0
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Study-level stratified k-fold split (scikit-learn ``StratifiedGroupKFold``).

    All images of a study fall in the same fold; folds are stratified by study abnormality
    (a study is abnormal when any of its images is).

    Parameters
    ----------
    records : sequence of ImageRecord
        The training images.
    k : int
        Number of folds (at least 2, at most the number of studies).
    seed : int
        Shuffle seed.

    Returns
    -------
    list of (train_ids, val_ids)
        Image ids per fold, each tuple in record order.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("records must have unique image ids")
    studies = [r.study_id for r in records]
    n_studies = len(set(studies))
    if n_studies < k:
        raise ValueError(f"k={k} folds need at least {k} studies, got {n_studies}")
    study_abnormal: dict[str, bool] = defaultdict(bool)
    for r in records:
        study_abnormal[r.study_id] |= r.abnormal
    y = np.array([int(study_abnormal[s]) for s in studies])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for train_idx, val_idx in splitter.split(np.zeros(len(ids)), y, groups=studies):
        folds.append(
            (tuple(ids[i] for i in sorted(train_idx)), tuple(ids[i] for i in sorted(val_idx)))
        )
    return folds


# --------------------------------------------------------------------------------------------
# Prepared-image cache
# --------------------------------------------------------------------------------------------


#: Version of this module's cache layout and of how it calls the preparation; bump it when
#: either changes. The key also holds a digest of ``spine_node/imaging.py`` (the preparation
#: code itself), so a changed ``prepare`` never serves stale images.
PREP_VERSION = 2


def prep_code_version() -> str:
    """``PREP_VERSION`` plus a digest of the preparation code (``spine_node.imaging``'s source)."""
    import spine_node.imaging as imaging

    digest = hashlib.sha256(Path(imaging.__file__).read_bytes()).hexdigest()[:12]
    return f"v{PREP_VERSION}-{digest}"


def params_key(params: PrepParams, version: str | None = None) -> str:
    """Short hash of the preparation parameters and code version (part of every cache name).

    Parameters
    ----------
    params : PrepParams
        Preparation parameters.
    version : str, optional
        Preparation code version (default :func:`prep_code_version`).
    """
    text = (
        f"t{params.triage_size}-d{params.detect_size}-c{params.clip_limit!r}-g{params.tiles}"
        f"-m{params.max_pixels}-{prep_code_version() if version is None else version}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_record(record: ImageRecord, params: PrepParams) -> PreparedImage:
    """Read a record's DICOM file and run the shared preparation on it."""
    ds = read_dataset(record.path, max_pixels=params.max_pixels)
    return prepare(ds, params)


@dataclass(frozen=True)
class CachePaths:
    """The files one record's preparation is cached in (one decode fills all three)."""

    triage: Path  # float32 (S, S) .npy
    detect: Path  # 8-bit letterboxed detection square, .png (as the YOLO export writes it)
    letterbox: Path  # .json of the Letterbox geometry


def cache_paths(record: ImageRecord, key: str, cache_dir: str | os.PathLike[str]) -> CachePaths:
    """Where ``record`` is cached under ``cache_dir`` for the key of :func:`params_key`."""
    stem = Path(cache_dir) / f"{record.image_id}_{key}"
    return CachePaths(
        triage=Path(f"{stem}_triage.npy"),
        detect=Path(f"{stem}_detect.png"),
        letterbox=Path(f"{stem}_letterbox.json"),
    )


def cache_record(
    record: ImageRecord, params: PrepParams, cache_dir: str | os.PathLike[str], key: str
) -> np.ndarray:
    """Decode and prepare ``record`` once and write its triage, detection and geometry files.

    Returns the triage image (float32, square, [0, 1]). The data root is only read.
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = cache_paths(record, key, folder)
    prep = prepare_record(record, params)
    triage = prep.triage.astype(np.float32, copy=False)
    _save_png(paths.detect, prep.detect)
    lb = prep.letterbox
    _atomic_text(
        paths.letterbox,
        json.dumps(
            {
                "scale": lb.scale,
                "pad_x": lb.pad_x,
                "pad_y": lb.pad_y,
                "size": lb.size,
                "source_shape": list(lb.source_shape),
            }
        ),
    )
    _atomic_save(paths.triage, triage)  # last: its presence means the record is complete
    return triage


def cached_triage_array(
    record: ImageRecord, params: PrepParams, cache_dir: str | os.PathLike[str] | None
) -> np.ndarray:
    """Return the record's prepared triage image (float32, square, [0, 1]), cached as .npy.

    Parameters
    ----------
    record : ImageRecord
        Image to prepare.
    params : PrepParams
        Preparation parameters (part of the cache key, with the preparation code's version).
    cache_dir : path or None
        Cache folder (created when missing; never inside a read-only data root unless asked);
        None disables the cache.

    Returns
    -------
    numpy.ndarray
        float32 (triage_size, triage_size).
    """
    if cache_dir is None:
        return prepare_record(record, params).triage.astype(np.float32, copy=False)
    key = params_key(params)
    target = cache_paths(record, key, cache_dir).triage
    if target.exists():
        try:
            return np.load(target)
        except (OSError, ValueError):
            logger.warning("cache file %s unreadable, rebuilding", target.name)
    return cache_record(record, params, cache_dir, key)


def cached_detect(
    record: ImageRecord, params: PrepParams, cache_dir: str | os.PathLike[str]
) -> tuple[Path, Letterbox]:
    """The cached detection PNG of ``record`` and its letterbox geometry (prepared if missing)."""
    key = params_key(params)
    paths = cache_paths(record, key, cache_dir)
    if not (paths.triage.exists() and paths.detect.exists() and paths.letterbox.exists()):
        cache_record(record, params, cache_dir, key)
    doc = json.loads(paths.letterbox.read_text(encoding="utf-8"))
    doc["source_shape"] = tuple(doc["source_shape"])
    return paths.detect, Letterbox(**doc)


def _warm_one(args: tuple[ImageRecord, PrepParams, str, str]) -> str:
    record, params, cache_dir, key = args
    cache_record(record, params, cache_dir, key)
    return record.image_id


def _warm_init() -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def default_workers() -> int:
    """Default number of loader / preparation workers: ``min(8, CPUs available)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def warm_cache(
    records: Sequence[ImageRecord],
    params: PrepParams,
    cache_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
) -> int:
    """Prepare every record not yet cached, each file decoded once, in a process pool.

    Parameters
    ----------
    records : sequence of ImageRecord
        Images to prepare.
    params : PrepParams
        Preparation parameters.
    cache_dir : path
        Cache folder.
    workers : int, optional
        Processes (default :func:`default_workers`; 0 or 1 prepares in this process).

    Returns
    -------
    int
        The number of records prepared now.
    """
    import concurrent.futures
    import multiprocessing

    key = params_key(params)
    todo = [r for r in records if not cache_paths(r, key, cache_dir).triage.exists()]
    if not todo:
        return 0
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    n = default_workers() if workers is None else workers
    jobs = [(r, params, str(cache_dir), key) for r in todo]
    if n <= 1 or len(todo) == 1:
        for job in jobs:
            _warm_one(job)
        return len(todo)
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in the workers
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(n, len(todo)), mp_context=ctx, initializer=_warm_init
    ) as pool:
        for _ in pool.map(_warm_one, jobs, chunksize=max(1, len(jobs) // (8 * n))):
            pass
    logger.info("prepared %d image(s) into %s with %d worker(s)", len(todo), cache_dir, n)
    return len(todo)


class TriageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Torch ``Dataset`` for the triage classifier: ``(image (1, S, S) float32, label float32)``.

    Images go through :func:`spine_node.imaging.prepare` (CLAHE, square resize) once and are
    cached as ``.npy`` under ``cache_dir``; members normalise the ``[0, 1]`` image themselves.

    Parameters
    ----------
    records : sequence of ImageRecord
        Images and labels.
    params : PrepParams
        Preparation parameters.
    cache_dir : path or None
        Where prepared arrays are cached (None: no cache).
    transform : callable, optional
        Applied to the ``(S, S)`` float32 numpy image before it becomes a tensor
        (augmentation); must return a 2-D or ``(C, S, S)`` array.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        params: PrepParams | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if params is None:
            params = PrepParams()
        if not isinstance(params, PrepParams):
            raise TypeError(f"params must be PrepParams, got {type(params).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.records = tuple(records)
        for r in self.records:
            if not isinstance(r, ImageRecord):
                raise TypeError(f"records must hold ImageRecord, got {type(r).__name__}")
        self.params = params
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """0/1 label of every record, in order."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    def array(self, index: int) -> np.ndarray:
        """The cached prepared triage image of record ``index`` (no transform)."""
        return cached_triage_array(self.records[index], self.params, self.cache_dir)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.array(index)
        if self.transform is not None:
            image = self.transform(image)
        if image.ndim == 2:
            image = image[None]
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        label = torch.tensor(float(self.records[index].label), dtype=torch.float32)
        return tensor, label

    def warm_cache(self, workers: int | None = 0) -> int:
        """Prepare every image not yet cached; returns the number prepared now.

        ``workers``: processes for :func:`warm_cache` (None: :func:`default_workers`).
        """
        if self.cache_dir is None:
            return 0
        return warm_cache(self.records, self.params, self.cache_dir, workers=workers)


# --------------------------------------------------------------------------------------------
# Ultralytics YOLO layout
# --------------------------------------------------------------------------------------------

YOLO_IMAGE_KINDS: tuple[str, ...] = ("detect", "enhanced")


@dataclass(frozen=True)
class YoloExport:
    """Where a YOLO data set was written."""

    data_yaml: Path
    counts: Mapping[str, int]  # images per split
    boxes: Mapping[str, int]  # boxes per split


def yolo_label_lines(
    boxes: Iterable[Box], width: float, height: float, transform: Callable[[np.ndarray], np.ndarray]
) -> list[str]:
    """YOLO label lines (``class cx cy w h``, normalised) for boxes mapped by ``transform``.

    Boxes that end up with no area inside the image are dropped.
    """
    lines = []
    for b in boxes:
        xyxy = transform(np.array([b.xyxy], dtype=np.float64))[0]
        x0, y0 = np.clip(xyxy[0], 0, width), np.clip(xyxy[1], 0, height)
        x1, y1 = np.clip(xyxy[2], 0, width), np.clip(xyxy[3], 0, height)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        cls = LESION_LABELS.index(b.label)
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
    return lines


def _save_png(path: Path, image: np.ndarray) -> None:
    import cv2

    data = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.png")
    if not cv2.imwrite(str(tmp), data):
        raise OSError(f"could not write {path}")
    os.replace(tmp, path)


def _export_fingerprint(
    splits: Mapping[str, Sequence[ImageRecord]], params: PrepParams, image_kind: str
) -> str:
    """Digest of everything an export's files depend on (records, boxes, preparation)."""
    h = hashlib.sha256(f"{image_kind}|{params_key(params)}|{sorted(LESION_LABELS)}".encode())
    for split, records in splits.items():
        h.update(f"|split {split}".encode())
        for r in records:
            h.update(f"|{r.image_id}:{[(b.label, b.xyxy) for b in r.boxes]}".encode())
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(src, tmp)
    except OSError:  # other file system, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def export_yolo(
    splits: Mapping[str, Sequence[ImageRecord]],
    out_dir: str | os.PathLike[str],
    *,
    params: PrepParams | None = None,
    image_kind: str = "detect",
    prepared: Callable[[ImageRecord], PreparedImage] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = 0,
) -> YoloExport:
    """Write records in the Ultralytics YOLO layout (PNG images, txt labels, data.yaml).

    An export whose ``export.json`` fingerprint (records, boxes, preparation parameters and
    code version, image kind) matches and whose files all exist is reused as it is (a resumed
    run does not export again).

    Parameters
    ----------
    splits : Mapping[str, sequence of ImageRecord]
        Split name (e.g. ``"train"``, ``"val"``, ``"test"``) to records.
    out_dir : path
        Output folder: ``images/<split>/<id>.png``, ``labels/<split>/<id>.txt``, ``data.yaml``.
    params : PrepParams, optional
        Preparation parameters (default: the spec's).
    image_kind : str
        ``"detect"``: the letterboxed ``detect_size`` square from ``prepare`` (boxes mapped
        with its :class:`~spine_node.imaging.Letterbox`); ``"enhanced"``: the CLAHE'd
        full-resolution image (Ultralytics then resizes it itself).
    prepared : callable, optional
        Returns the PreparedImage of a record (default: read and prepare its DICOM file).
    cache_dir : path, optional
        Prepared-image cache (``"detect"`` only): images come from it (linked, not re-encoded),
        so each DICOM file is decoded once for the classifier and the detector together.
    workers : int, optional
        Processes that fill the cache first (see :func:`warm_cache`).

    Returns
    -------
    YoloExport
        Path of ``data.yaml`` and counts. ``names`` follow ``LESION_LABELS`` order.
    """
    import yaml

    if image_kind not in YOLO_IMAGE_KINDS:
        raise ValueError(f"image_kind must be one of {YOLO_IMAGE_KINDS}, got {image_kind!r}")
    if not splits:
        raise ValueError("splits must name at least one split")
    params = params or PrepParams()
    root = Path(out_dir).resolve()
    for split in splits:
        if not split or "/" in split or split.startswith("."):
            raise ValueError(f"split names must be plain folder names, got {split!r}")
    fingerprint = _export_fingerprint(splits, params, image_kind)
    stamp = root / "export.json"
    data_yaml = root / "data.yaml"
    if stamp.is_file() and data_yaml.is_file() and prepared is None:
        try:
            done = json.loads(stamp.read_text(encoding="utf-8"))
        except ValueError:
            done = {}
        complete = done.get("fingerprint") == fingerprint and all(
            (root / "images" / split / f"{r.image_id}.png").is_file()
            and (root / "labels" / split / f"{r.image_id}.txt").is_file()
            for split, records in splits.items()
            for r in records
        )
        if complete:
            logger.info("YOLO data set in %s is up to date; reused", root)
            return YoloExport(data_yaml=data_yaml, counts=done["counts"], boxes=done["boxes"])
    stamp.unlink(missing_ok=True)
    use_cache = cache_dir is not None and prepared is None and image_kind == "detect"
    if use_cache:
        warm_cache(
            [r for records in splits.values() for r in records],
            params,
            _required_path(cache_dir),
            workers=workers,
        )
    get = prepared or (lambda r: prepare_record(r, params))
    counts: dict[str, int] = {}
    n_boxes: dict[str, int] = {}
    for split, records in splits.items():
        img_dir = root / "images" / split
        lab_dir = root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        counts[split] = 0
        n_boxes[split] = 0
        for record in records:
            if use_cache:
                png, letterbox = cached_detect(record, params, _required_path(cache_dir))
                lines = yolo_label_lines(
                    record.boxes, letterbox.size, letterbox.size, letterbox.to_letterbox
                )
                _link_or_copy(png, img_dir / f"{record.image_id}.png")
            else:
                prep = get(record)
                if image_kind == "detect":
                    image = prep.detect
                    lines = yolo_label_lines(
                        record.boxes, image.shape[1], image.shape[0], prep.letterbox.to_letterbox
                    )
                else:
                    image = prep.enhanced
                    lines = yolo_label_lines(
                        record.boxes, image.shape[1], image.shape[0], lambda b: b
                    )
                _save_png(img_dir / f"{record.image_id}.png", image)
            (lab_dir / f"{record.image_id}.txt").write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8"
            )
            counts[split] += 1
            n_boxes[split] += len(lines)
    names = dict(enumerate(LESION_LABELS))
    data: dict[str, Any] = {"path": str(root), "names": names, "nc": len(LESION_LABELS)}
    for split in splits:
        data[split] = f"images/{split}"
    if "val" not in data and "train" in data:
        data["val"] = data["train"]
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if prepared is None:
        _atomic_text(
            stamp, json.dumps({"fingerprint": fingerprint, "counts": counts, "boxes": n_boxes})
        )
    logger.info("YOLO data set: %s images, %s boxes in %s", counts, n_boxes, root)
    return YoloExport(data_yaml=data_yaml, counts=counts, boxes=n_boxes)


def _required_path(value: str | os.PathLike[str] | None) -> Path:
    """``Path(value)``; TypeError when ``value`` is None."""
    if value is None:
        raise TypeError("a path is required, got None")
    return Path(value)


def to_ultralytics(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fold: int = 0,
    folds: int = 5,
    imgsz: int = 640,
    seed: int = 0,
    params: PrepParams | None = None,
) -> Path:
    """Export one study-level fold of a VinDr-layout data set to the YOLO layout.

    ``train``/``val`` are fold ``fold`` of :func:`study_stratified_kfold` on the train split;
    ``test`` is the official test split when it exists. Images are the letterboxed
    ``imgsz`` squares of :func:`spine_node.imaging.prepare`.

    Returns
    -------
    pathlib.Path
        The ``data.yaml`` written.
    """
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold must be an int in [0, {folds}), got {fold!r}")
    base = params or PrepParams()
    prep = PrepParams(
        triage_size=base.triage_size,
        detect_size=imgsz,
        clip_limit=base.clip_limit,
        tiles=base.tiles,
        max_pixels=base.max_pixels,
    )
    records = load_records(data_dir, "train")
    by_id = {r.image_id: r for r in records}
    train_ids, val_ids = study_stratified_kfold(records, folds, seed)[fold]
    splits: dict[str, Sequence[ImageRecord]] = {
        "train": [by_id[i] for i in train_ids],
        "val": [by_id[i] for i in val_ids],
    }
    if (Path(data_dir) / "annotations" / "test.csv").is_file():
        splits["test"] = load_records(data_dir, "test")
    return export_yolo(splits, out_dir, params=prep, image_kind="detect").data_yaml


__all__ = [
    "NO_FINDING",
    "Box",
    "ImageRecord",
    "TriageDataset",
    "YoloExport",
    "cached_triage_array",
    "export_yolo",
    "load_records",
    "params_key",
    "prepare_record",
    "read_annotations",
    "study_stratified_kfold",
    "to_ultralytics",
    "yolo_label_lines",
]
