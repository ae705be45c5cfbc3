"""``spine-node export``: copy received images and their result objects out for research,
de-identified (PS3.15 basic profile) unless ``--identified`` is given explicitly."""

from __future__ import annotations

import argparse
import logging
import secrets
from pathlib import Path

from pydicom import dcmread

from spine_node.config import Settings
from spine_node.deid import deidentify, uid_mapper
from spine_node.results.types import ResultRecord
from spine_node.spool import relative_name

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spine-node export``."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--identified", action="store_true",
                        help="export WITHOUT de-identification (default: de-identify)")
    parser.add_argument("--salt", default=None,
                        help="UID mapping secret (default: random; reuse it to keep UIDs stable)")


def export_name(study: int, image: int, obj: int) -> str:
    """File name of one exported object, made from counters only, never from a received UID.

    ``obj`` 0 is the source image, 1.. its result objects (SR first). A UID from the wire
    (which may hold ``../`` or a separator) never reaches a path.

    Raises
    ------
    ValueError
        When a number is out of range.
    """
    if study < 1 or image < 1 or obj < 0:
        raise ValueError(f"export numbers must be study>=1, image>=1, obj>=0, got "
                         f"{(study, image, obj)!r}")
    kind = "image" if obj == 0 else f"result{obj}"
    return f"study{study:05d}_image{image:05d}_{kind}.dcm"


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Export every study with results to ``args.out``; returns 0."""
    from spine_node.node import open_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    remap = None if args.identified else uid_mapper(args.salt or secrets.token_hex(16))
    store = open_store(settings)
    try:
        studies = store.studies()
    finally:
        store.close()
    written = 0
    for study_number, study in enumerate(studies, start=1):
        for image_number, (sop_uid, payload) in enumerate(study["results"], start=1):
            record = ResultRecord.from_json(payload)
            files = [settings.spool_dir / relative_name(sop_uid)]
            files += [settings.outbox_dir / relative_name(uid) for uid in record.objects]
            for object_number, path in enumerate(files):
                if not path.is_file():
                    continue  # a source image removed by spool retention
                ds = dcmread(path, force=True)
                if remap is not None:
                    deidentify(ds, remap)
                ds.save_as(
                    out / export_name(study_number, image_number, object_number),
                    enforce_file_format=False,
                )
                written += 1
    print(f"exported {written} objects to {out}"
          f"{'' if remap is None else ' (de-identified, PS3.15 basic profile)'}")
    return 0
