"""Ingest benchmark: the spine-node receiver against pynetdicom's and DCMTK's ``storescp``.

The same set of large uncompressed DX images (about 10 MB each) is sent with DCMTK ``storescu``
(one association per round) to three C-STORE SCPs on loopback:

* ``node``: the spine-node receiver, durable (fsync of file and directory, SQLite WAL commit
  before each Success), with a fresh ``data_dir`` on disk every round;
* ``pynetdicom``: the bare ``python -m pynetdicom storescp`` app writing to a directory;
* ``dcmtk``: DCMTK ``storescp -od DIR``.

Every server is started fresh (new output directory) for each round and stopped afterwards;
``os.sync()`` runs between rounds, untimed, so no target pays for another's write-back. The
order of the targets rotates each round. Figures are medians over rounds; the node's goal is
>= 0.9x pynetdicom and >= 1.0x DCMTK in images per second.

Run from the repository root::

    .venv/bin/python benchmarks/ingest.py --images 20 --size-mb 10 --rounds 7
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
TARGETS = ("node", "pynetdicom", "dcmtk")
#: Goals for node / peer throughput (images per second).
GOALS = {"pynetdicom": 0.9, "dcmtk": 1.0}
CALLED_AE = {"node": "SPINENODE", "pynetdicom": "PYNETDICOM", "dcmtk": "DCMTKSCP"}
CALLING_AE = "BENCHSCU"


@dataclass(frozen=True)
class RoundResult:
    """One timed transfer of the whole image set to one target."""

    target: str
    seconds: float
    images: int
    megabytes: float

    @property
    def images_per_s(self) -> float:
        """Images acknowledged per second."""
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10^6 bytes) per second."""
        return self.megabytes / self.seconds


@dataclass(frozen=True)
class TargetSummary:
    """Median figures of one target over all rounds."""

    target: str
    images_per_s: float
    mb_per_s: float
    seconds: tuple[float, ...]


def side_for_megabytes(size_mb: float) -> int:
    """Side of a square 16-bit image whose pixel data is about ``size_mb`` MB (10^6 bytes).

    Raises
    ------
    ValueError
        When ``size_mb`` is not a positive number.
    """
    if isinstance(size_mb, bool) or not isinstance(size_mb, int | float) or not size_mb > 0:
        raise ValueError(f"size_mb must be a positive number, got {size_mb!r}")
    return max(8, round(math.sqrt(size_mb * 1e6 / 2)))


def make_dx_dataset(side: int, *, seed: int = 0) -> Dataset:
    """Build an uncompressed 16-bit (12 stored) DX For Presentation image, ``side`` x ``side``.

    Parameters
    ----------
    side : int
        Rows and columns.
    seed : int
        Seed of the pixel noise.

    Returns
    -------
    pydicom.Dataset
        A dataset with file meta, ready for ``save_as(..., enforce_file_format=True)``.
    """
    if isinstance(side, bool) or not isinstance(side, int) or side < 8:
        raise ValueError(f"side must be an int >= 8, got {side!r}")
    rng = np.random.default_rng(seed)
    y = np.linspace(-1.0, 1.0, side, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, side, dtype=np.float32)[None, :]
    column = np.exp(-(x**2) / 0.08) * (0.75 + 0.25 * np.cos(y * 11.0))
    noise = rng.integers(0, 160, (side, side), dtype=np.uint16)
    pixels = (column * 3600.0).astype(np.uint16) + noise
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPClassUID = DX_FOR_PRESENTATION
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Bench^Phantom"
    ds.PatientID = "BENCH"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "AP"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.minimum(pixels, 4095).astype("<u2").tobytes()
    return ds


def write_images(directory: Path, count: int, size_mb: float) -> list[Path]:
    """Write ``count`` DX images of about ``size_mb`` MB each into ``directory``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    side = side_for_megabytes(size_mb)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"dx{i:04d}.dcm"
        make_dx_dataset(side, seed=i).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts TCP connections on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def count_files(directory: Path, pattern: str = "*") -> int:
    """Number of regular files under ``directory`` matching ``pattern`` (recursively)."""
    return sum(1 for p in directory.rglob(pattern) if p.is_file() and not p.name.endswith(".part"))


class Server:
    """A C-STORE SCP started for one round: ``start`` returns its port, ``stop`` ends it."""

    def __init__(self, target: str, out_dir: Path, max_pdu: int) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.out_dir = out_dir
        self.max_pdu = max_pdu
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._node: object | None = None

    def start(self) -> int:
        """Start the server and wait until it listens."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.target == "node":
            from spine_node.config import settings_from_mapping
            from spine_node.node import start_node

            settings = settings_from_mapping(
                {
                    "ae_title": CALLED_AE["node"],
                    "port": self.port,
                    "bind_address": "127.0.0.1",
                    "data_dir": str(self.out_dir),
                    "max_pdu_length": self.max_pdu,
                },
                environ={},
            )
            self._node = start_node(settings, ("receiver",))
        elif self.target == "pynetdicom":
            cmd = [sys.executable, "-m", "pynetdicom", "storescp", str(self.port),
                   "-aet", CALLED_AE["pynetdicom"], "-ba", "127.0.0.1",
                   "-od", str(self.out_dir), "-pdu", str(self.max_pdu)]  # fmt: skip
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            cmd = ["storescp", "-aet", CALLED_AE["dcmtk"], "-od", str(self.out_dir),
                   "-pdu", str(self.max_pdu), str(self.port)]  # fmt: skip
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port)
        return self.port

    def received(self) -> int:
        """Objects the target has stored."""
        if self.target == "node":
            return count_files(self.out_dir / "spool", "*.dcm")
        return count_files(self.out_dir)

    def stop(self) -> None:
        """Stop the server."""
        if self._node is not None:
            self._node.stop()  # type: ignore[attr-defined]
            self._node = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def send(port: int, called_ae: str, files: Sequence[Path]) -> float:
    """Send ``files`` in one association with DCMTK ``storescu``; return the wall time in s.

    Raises
    ------
    RuntimeError
        When ``storescu`` fails.
    """
    cmd = ["storescu", "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(port),
           *map(str, files)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed ({proc.returncode}): {proc.stderr}")
    return elapsed


def run_round(target: str, files: Sequence[Path], work: Path, max_pdu: int) -> RoundResult:
    """Start ``target`` fresh, send every file once, check every image was stored, clean up."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=work))
    server = Server(target, out_dir, max_pdu)
    try:
        port = server.start()
        seconds = send(port, CALLED_AE[target], files)
        stored = server.received()
    finally:
        server.stop()
    if stored != len(files):
        raise RuntimeError(f"{target} stored {stored} of {len(files)} images")
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    shutil.rmtree(out_dir, ignore_errors=True)
    os.sync()  # untimed: the next target must not pay for this one's write-back
    return RoundResult(target, seconds, len(files), megabytes)


def durable_write_seconds(files: Sequence[Path], work: Path) -> float:
    """Time to write copies of ``files`` with fsync of each file and of the directory.

    The disk's own floor for durable storage of the set, with no network or DICOM involved:
    printed next to the targets to show how much of the node's time durability costs.
    """
    blobs = [p.read_bytes() for p in files]
    out_dir = Path(tempfile.mkdtemp(prefix="fsync-", dir=work))
    start = time.perf_counter()
    for i, blob in enumerate(blobs):
        fd = os.open(out_dir / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    os.sync()
    return elapsed


def summarise(results: Sequence[RoundResult]) -> dict[str, TargetSummary]:
    """Median images/s and MB/s per target over its rounds."""
    out = {}
    for target in TARGETS:
        mine = [r for r in results if r.target == target]
        if not mine:
            continue
        out[target] = TargetSummary(
            target,
            statistics.median(r.images_per_s for r in mine),
            statistics.median(r.mb_per_s for r in mine),
            tuple(r.seconds for r in mine),
        )
    return out


def report(summary: dict[str, TargetSummary], print_fn: Callable[[str], None] = print) -> None:
    """Print one line per target and the node/peer ratios against their goals."""
    for s in summary.values():
        rounds = ", ".join(f"{t:.2f}" for t in s.seconds)
        print_fn(
            f"{s.target:<11} {s.images_per_s:8.2f} images/s {s.mb_per_s:9.1f} MB/s"
            f"   (round seconds: {rounds})"
        )
    node = summary["node"].images_per_s
    for peer, goal in GOALS.items():
        ratio = node / summary[peer].images_per_s
        verdict = "met" if ratio >= goal else "NOT met"
        print_fn(f"ratio node/{peer} = {ratio:.2f}x (goal >= {goal:.1f}x: {verdict})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20, help="images per round (default 20)")
    p.add_argument("--size-mb", type=float, default=10.0, help="MB per image (default 10)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per target (default 7)")
    p.add_argument("--max-pdu", type=int, default=65536,
                   help="max receive PDU of all three SCPs (default 65536, the node's default)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None,
                   help="directory on the disk under test (default: a new temporary directory)")  # fmt: skip
    args = p.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or not args.size_mb > 0:
        p.error("--images and --rounds must be >= 1 and --size-mb > 0")
    if not 4096 <= args.max_pdu <= 131072:
        p.error(f"--max-pdu must be between 4096 and 131072 (DCMTK's range), got {args.max_pdu}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures; return the exit status."""
    args = parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"DCMTK {tool} is not installed", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="spine-ingest-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        files = write_images(work / "images", args.images, args.size_mb)
        side = side_for_megabytes(args.size_mb)
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        for p in files:  # warm the page cache so every target reads the sources from memory
            p.read_bytes()
        print(
            f"ingest benchmark: {len(files)} DX images {side}x{side} 16-bit uncompressed, "
            f"{total_mb / len(files):.1f} MB each ({total_mb:.1f} MB per round), "
            f"{args.rounds} round(s), storescu one association per round, max PDU {args.max_pdu}, "
            f"work dir {work} (generated in {time.perf_counter() - t0:.1f} s); "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        results = []
        floors = []
        for r in range(args.rounds):
            order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
            for target in order:
                result = run_round(target, files, work, args.max_pdu)
                print(
                    f"  round {r + 1} {target:<11} {result.seconds:7.2f} s "
                    f"{result.images_per_s:8.2f} images/s {result.mb_per_s:9.1f} MB/s"
                )
                results.append(result)
            floors.append(durable_write_seconds(files, work))
            print(f"  round {r + 1} disk floor  {floors[-1]:7.2f} s (write + fsync, no network)")
        print(f"median over {args.rounds} round(s):")
        report(summarise(results))
        floor = statistics.median(floors)
        print(
            f"disk floor: write + fsync of the same set takes {floor:.2f} s "
            f"({total_mb / floor:.1f} MB/s); only the node pays it (the peers do not fsync)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
