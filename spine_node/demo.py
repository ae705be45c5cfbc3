"""``spine-node demo``: the whole node end to end on loopback with the embedded demo bundle.

It starts the node (SQLite, all roles and the web status page on a free loopback port, read-only
and without a token, its URL printed) and a local PACS stand-in that writes what it receives
to ``DIR/pacs``, sends the sample studies shipped in ``spine_node/samples`` by C-STORE, waits for
the results and prints a table pointing at the SR and overlay files received. It then stops and
exits, closing the page; with ``--keep-open`` the node and its page stay up until Ctrl-C.

The samples are standard DICOM (CR Image Storage, valid UIDs, Explicit VR Little Endian) made
from the synthetic phantom when the demo bundle is built (``training.samples``);
``spine-node demo --write-samples DIR`` copies them out for loading into a PACS.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from spine_node.config import Settings, settings_from_mapping
from spine_node.results.types import ResultRecord, Status, display_label

logger = logging.getLogger(__name__)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
#: The demo's roles: the whole pipeline and the status page.
DEMO_ROLES = ("receiver", "worker", "dispatcher", "web")
_KIND = {"SR": "SR", "OT": "overlay", "PR": "GSPS"}



def _cli_name() -> str:
    """How to call ``spine-node`` from here: its script beside this Python (the venv), or the
    bare name when that is not there (installed elsewhere on PATH)."""
    script = Path(sys.executable).parent / "spine-node"
    return str(script) if script.is_file() else "spine-node"

def samples_dir() -> Path:
    """The sample studies shipped inside the package (``spine_node/samples``)."""
    return Path(str(resources.files("spine_node") / "samples"))


def sample_files(studies: int | None = None) -> list[Path]:
    """The shipped sample files, sorted by study and image; the first ``studies`` studies only.

    Raises
    ------
    FileNotFoundError
        When the package has no samples (a broken installation).
    """
    files = sorted(samples_dir().glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no sample studies in {samples_dir()}")
    if studies is None:
        return files
    if studies < 1:
        raise ValueError(f"studies must be >= 1, got {studies!r}")
    keep = sorted({p.name.rsplit("-", 1)[0] for p in files})[:studies]
    return [p for p in files if p.name.rsplit("-", 1)[0] in keep]


def write_samples(out_dir: Path) -> list[Path]:
    """Copy the sample studies (and their ``index.json``) to ``out_dir``; return the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in [*sample_files(), samples_dir() / "index.json"]:
        target = out_dir / path.name
        shutil.copyfile(path, target)
        written.append(target)
    return written


@dataclass(frozen=True)
class _Pacs:
    server: Any
    port: int
    out_dir: Path


def start_pacs(out_dir: Path, port: int = 0) -> _Pacs:
    """Start a C-STORE SCP (AE ``DEMOPACS``) writing each object to ``out_dir/<modality>/``."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        kind = str(ds.get("Modality", "OT"))
        target = out_dir / kind
        target.mkdir(exist_ok=True)
        ds.save_as(target / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title="DEMOPACS")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax))
    ae.add_supported_context(Verification)
    server: Any = ae.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return _Pacs(server, int(server.server_address[1]), out_dir)


def send_files(port: int, datasets: list[Dataset], called_ae: str) -> list[int]:
    """C-STORE datasets to the node; return the DIMSE statuses."""
    ae = AE(ae_title="DEMOMODALITY")
    for syntax in sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(CR_IMAGE_STORAGE, syntax)  # one context per syntax: no re-encode
    ae.add_requested_context(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node on port {port} refused the association")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spine-node demo``."""
    parser.add_argument("--out", default="spine-node-demo",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--studies", type=int, default=None,
                        help="send only the first N sample studies (default: all)")
    parser.add_argument("--write-samples", metavar="DIR", default=None,
                        help="only copy the sample studies (standard DICOM: CR, valid UIDs, "
                        "Explicit VR Little Endian) to DIR, for loading into a PACS, and exit")
    parser.add_argument("--bundle", default="demo", help="bundle directory (default: embedded demo)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for results")
    parser.add_argument("--keep-open", action="store_true",
                        help="after the results, keep the node and its status page running "
                        "until Ctrl-C (default: stop and exit)")


def _wait_for_interrupt() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM; the previous handlers are put back."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every image ended in a visible outcome delivered to the PACS."""
    from spine_node.logs import configure_logging
    from spine_node.node import NoBundle, resolve_bundle, start_node

    if args.write_samples:
        for path in write_samples(Path(args.write_samples)):
            print(path)
        print("synthetic phantom studies (PatientName PHANTOM^...), not patient data; "
              "send them with e.g. storescu -aet MODALITY1 -aec SPINENODE HOST PORT *.dcm "
              "(-aet: a calling AE title in allowed_calling_aes; -aec: the node's ae_title)")
        return 0
    configure_logging("WARNING", False)
    out = Path(args.out).resolve()
    try:
        resolve_bundle(args.bundle)
    except NoBundle as exc:
        print(f"spine-node demo: {exc}", file=sys.stderr)
        return 2
    print(f"spine-node demo: output in {out}")
    pacs = start_pacs(out / "pacs")
    settings = settings_from_mapping(
        {
            "ae_title": "SPINENODE",
            "port": _free_port(),
            "bind_address": "127.0.0.1",
            "data_dir": str(out / "node"),
            "min_free_bytes": 0,
            "bundle": args.bundle,
            "sweep_interval_s": 0.5,
            "worker_poll_s": 0.2,
            "results": {"gsps": True},
            # the status page, read-only: loopback needs no token (docs/security.md)
            "web": {"port": _free_port(), "bind_address": "127.0.0.1"},
            "destinations": [{"name": "pacs", "ae_title": "DEMOPACS", "host": "127.0.0.1",
                              "port": pacs.port}],
        },
        environ={},
    )
    if (out / "node").is_dir() and any((out / "node").iterdir()):
        print(f"spine-node demo: reusing the node state in {out / 'node'} from an earlier run "
              "(images already analysed are not analysed again; --out NEW_FOLDER starts afresh)")
    config = write_config(out / "spine-node.toml", settings)
    datasets: list[Dataset] = [dcmread(f) for f in sample_files(args.studies)]
    print(f"starting the node on 127.0.0.1:{settings.port} (bundle: {args.bundle}) ...")
    t0 = time.monotonic()
    node = start_node(settings, DEMO_ROLES)
    page = f"http://127.0.0.1:{node.web.port}/"
    print(f"status page: {page} (open it in a browser while the demo runs; "
          "--keep-open keeps it open afterwards)", flush=True)
    try:
        statuses = send_files(settings.port, datasets, settings.ae_title)
        print(f"sent {len(datasets)} images by C-STORE: "
              f"{sum(s == 0 for s in statuses)} acknowledged")
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            status = node.store.status()
            jobs = status["jobs"]
            pending_jobs = jobs["queued"] + jobs["running"] + jobs["failed"]
            sends = status["outbound"].get("pacs", {})
            pending_sends = sends.get("pending", 0) + sends.get("sending", 0)
            if pending_jobs == 0 and pending_sends == 0 and sum(jobs.values()) >= len(datasets):
                break
            time.sleep(0.5)
        else:
            print("spine-node demo: timed out waiting for results", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - t0
        rows = []
        for entry in node.store.studies():
            for uid, payload in entry["results"]:
                rows.append((entry["study_instance_uid"], uid, ResultRecord.from_json(payload)))
        _print_results(out, rows, elapsed)
        print(f"inspect it: {_cli_name()} status --config {config}  (also worklist, feedback list)")
        if args.keep_open:
            print(f"status page: {page} (the node keeps running: press Ctrl-C to stop)",
                  flush=True)
            _wait_for_interrupt()
        else:
            print(f"status page: {page} closed with the demo "
                  "(spine-node demo --keep-open keeps it open until Ctrl-C)")
    finally:
        node.stop()
        pacs.server.shutdown()
    return 0 if len(rows) == len(datasets) else 1


def write_config(path: Path, settings: Settings) -> Path:
    """Write the demo node's settings that the CLI needs (data directory, bundle, AE title).

    ``spine-node status|worklist|feedback --config PATH`` then read the demo's database.

    Parameters
    ----------
    path : pathlib.Path
        The TOML file to write (replaced).
    settings : Settings
        The demo node's settings.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    lines = [
        "# written by spine-node demo: the demo node's data, for status, worklist and feedback",
        f"ae_title = {json.dumps(settings.ae_title)}",
        f"data_dir = {json.dumps(str(settings.data_dir))}",
    ]
    if settings.bundle is not None:
        lines.append(f"bundle = {json.dumps(str(settings.bundle))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _print_results(out: Path, rows: list[tuple[str, str, ResultRecord]], elapsed: float) -> None:
    """The triage table, the result objects the PACS stand-in received, the demo warning."""
    received = sorted(p for p in (out / "pacs").rglob("*.dcm"))
    print()
    print(f"{'study':<14} {'image':<14} {'status':<14} {'score':>6}  findings")
    for study, uid, record in rows:
        result = record.result
        score = "-" if result.score is None else f"{result.score:.3f}"
        findings = ", ".join(f"{display_label(f.label)} {f.score:.2f}" for f in result.findings)
        if result.status is Status.NOT_PROCESSED:
            findings = f"not processed: {result.reason}"
        print(f"...{study[-11:]:<11} ...{uid[-11:]:<11} {result.status.value:<14} {score:>6}  "
              f"{findings or '-'}")
    by_uid = {p.stem: p for p in received}
    print()
    print("result objects received by the PACS stand-in, per image:")
    for _study, uid, record in rows:
        files = [by_uid[o] for o in record.objects if o in by_uid]
        named = ", ".join(f"{_KIND.get(p.parent.name, p.parent.name)} {p.relative_to(out)}"
                          for p in files)
        print(f"  ...{uid[-11:]}: {named or 'none yet'}")
    print()
    print(f"{len(rows)} results in {elapsed:.1f} s; the PACS stand-in received {len(received)} "
          f"objects under {out / 'pacs'}:")
    for kind in sorted({p.parent.name for p in received}):
        n = sum(1 for p in received if p.parent.name == kind)
        example = next(p for p in received if p.parent.name == kind)
        print(f"  {kind:<3} {n:>3} files, e.g. {example}")
    print("DEMO BUNDLE: phantom-trained, not for clinical use.")
