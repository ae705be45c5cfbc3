"""``spine-node export``: copy received images and their result objects out for research,
de-identified (PS3.15 basic profile) unless ``--identified`` is given explicitly."""

from __future__ import annotations

import argparse
import logging
import secrets
from pathlib import Path

from pydicom import dcmread

from spine_node.deid import deidentify, uid_mapper
from spine_node.spool import relative_name

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spine-node export``."""
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--identified", action="store_true",
                        help="export WITHOUT de-identification (default: de-identify)")
    parser.add_argument("--salt", default=None,
                        help="UID mapping secret (default: random; reuse it to keep UIDs stable)")


def run(args: argparse.Namespace) -> int:
    """Export every study with results; returns 0."""
    from spine_node.cli import _settings
    from spine_node.node import open_store

    settings = _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    remap = None if args.identified else uid_mapper(args.salt or secrets.token_hex(16))
    store = open_store(settings)
    try:
        studies = store.studies()
    finally:
        store.close()
    written = 0
    for study in studies:
        for sop_uid, payload in study["results"]:
            files = [settings.spool_dir / relative_name(sop_uid)]
            files += [settings.outbox_dir / relative_name(uid) for uid in payload.get("objects", [])]
            for path in files:
                if not path.is_file():
                    continue  # a source image removed by spool retention
                ds = dcmread(path, force=True)
                if remap is not None:
                    deidentify(ds, remap)
                ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=False)
                written += 1
    print(f"exported {written} objects to {out}"
          f"{'' if remap is None else ' (de-identified, PS3.15 basic profile)'}")
    return 0
