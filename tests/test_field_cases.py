"""Field cases (``../shared/field-cases``) against a running node, with real peers.

One node per module (``spine-node serve``, SQLite, all roles, the embedded demo bundle so the
cascade really runs, GSPS on) delivers to DCMTK ``storescp`` playing the PACS. File cases are
generated with their script into a temporary directory and sent by pynetdicom proposing each
file's own transfer syntax (one association per case); network cases (F10, F14, F15) run
their script as the sender. Each test checks what the case's docstring demands: the outcome
per image, the objects that reach the PACS, their UIDs / names, and ``dciodvfy`` (0 errors)
on every object received.

The cases live beside the clone (``../shared/field-cases``, as in CI); without them the
module fails with a message saying where they were looked for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
)
from pydicom.valuerep import PersonName
from pynetdicom import AE

from spine_node.config import Settings
from spine_node.imaging import decode
from spine_node.results import codes
from spine_node.results.priority import study_priority
from spine_node.results.types import CascadeResult, Status
from spine_node.store import JobStore
from tests.nodekit import StoreSCP, node_settings, wait_for, write_config
from tests.results_kit import dciodvfy_errors

CASES = Path(__file__).resolve().parents[2] / "shared" / "field-cases"
CLI = [sys.executable, "-m", "spine_node.cli"]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
PROCESSED = ("positive", "negative")
SEED = "spine-node-field-cases"
CALLING_AE = "FIELDCASES"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- peers


class PacsSCP(StoreSCP):
    """DCMTK ``storescp`` as the PACS; unique file names so that a duplicate is seen."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(out_dir, unique_names=True)

    def objects(self) -> list[tuple[Path, Dataset]]:
        return [(p, dcmread(p)) for p in sorted(self.out_dir.iterdir())
                if p.is_file() and not p.name.endswith(".explicit")]


@dataclass
class Node:
    settings: Settings
    config: Path
    log: Path
    pacs: PacsSCP
    proc: subprocess.Popen[bytes]
    work: Path
    _store: JobStore | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.settings.port)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore.open(self.settings.db_url)
        return self._store

    def status(self) -> dict[str, Any]:
        return self.store.status()

    def results(self, study_uid: str) -> dict[str, dict[str, Any]]:
        """Result payloads of a study by source SOP Instance UID (the last one wins)."""
        return dict(self.store.study_results(study_uid))

    def settle(self, image_uids: list[str], timeout: float = 600.0) -> None:
        """Wait until every listed image has a terminal job and nothing is queued or unsent."""

        def done() -> bool:
            if any(self.store.job_state(u) not in ("done", "not_processed", "dead")
                   for u in image_uids):
                return False
            s = self.status()
            jobs = s["jobs"]
            if jobs.get("queued", 0) or jobs.get("running", 0) or jobs.get("failed", 0):
                return False
            sends = s["outbound"].get("pacs", {})
            return not (sends.get("pending", 0) or sends.get("sending", 0))

        wait_for(done, timeout=timeout, interval=0.5)

    def worklist(self) -> list[dict[str, Any]]:
        out = subprocess.run([*CLI, "worklist", "--config", str(self.config), "--json"],
                             capture_output=True, text=True, timeout=120, check=True)
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows


@pytest.fixture(scope="module")
def cases() -> Path:
    if not (CASES / "README.md").is_file():
        pytest.fail(
            f"field cases not found at {CASES}: this test needs the shared/field-cases folder "
            "beside the repository clone (../shared/field-cases), as CI checks it out"
        )
    return CASES


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, cases: Path) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("field")
    pacs = PacsSCP(work / "pacs").start()
    settings = node_settings(
        work, bundle="demo", device="cpu", results={"gsps": True},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs.port}],
    )
    config = write_config(work / "node.toml", settings)
    log = work / "node.log"
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
    node = Node(settings, config, log, pacs, proc, work)
    try:
        wait_for(lambda: proc.poll() is not None or subprocess.run(
            ["echoscu", "-aec", settings.ae_title, "127.0.0.1", str(settings.port)],
            capture_output=True).returncode == 0, timeout=120)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield node
    finally:
        if node._store is not None:
            node._store.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        pacs.stop()


# --------------------------------------------------------------------------- helpers


def generate(cases: Path, script: str, out: Path) -> list[Path]:
    """Run a file-case generator into ``out``; return the files it wrote."""
    (path,) = cases.glob(f"{script}_*.py")
    run = subprocess.run([sys.executable, str(path), str(out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CASE_SEED": SEED})
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(out.glob("*.dcm"))


def run_network_case(cases: Path, script: str, node: Node, out: Path) -> str:
    """Run a network case as the sender against ``node``; return its printed output."""
    (path,) = cases.glob(f"{script}_*.py")
    run = subprocess.run(
        [sys.executable, str(path), "127.0.0.1", str(node.port), node.settings.ae_title,
         str(out)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "CASE_SEED": SEED, "CALLING_AE": CALLING_AE},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    return run.stdout


def send(node: Node, paths: list[Path]) -> dict[str, int]:
    """C-STORE ``paths`` in one association, each proposed in its own transfer syntax."""
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for pair in dict.fromkeys((str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                              for d in datasets):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established, "the node refused the association"
    statuses: dict[str, int] = {}
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses[str(ds.SOPInstanceUID)] = int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()
    return statuses


def ui_values(ds: Dataset) -> set[str]:
    """Every UI value anywhere in ``ds`` (nested sequences included)."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            found.update(str(v) for v in values)
    return found


def objects_for(node: Node, sop_uids: set[str]) -> list[tuple[Path, Dataset]]:
    """Objects received at the PACS that reference any of ``sop_uids``."""
    return [(p, ds) for p, ds in node.pacs.objects() if ui_values(ds) & sop_uids]


def check_dciodvfy(
    objects: list[tuple[Path, Dataset]], *, carried: frozenset[str] = frozenset()
) -> None:
    """0 errors from dciodvfy; with ``carried`` UIDs, only their leading-zero complaint is allowed
    (PS3.5 9.1 forbids the zeros, but the issue requires such UIDs to be carried verbatim)."""
    for path, ds in objects:
        readable = path
        if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
            # dciodvfy cannot inflate: check the same data set in Explicit VR Little Endian
            readable = path.with_name(path.name + ".explicit")
            subprocess.run(["dcmconv", "+te", str(path), str(readable)], check=True,
                           capture_output=True, timeout=120)
        errors = [
            line for line in dciodvfy_errors(readable)
            if not ("Leading zeroes in embedded numeric component" in line
                    and any(f"<{uid}>" in line for uid in carried))
        ]
        assert errors == [], f"{ds.Modality} {path.name}: {errors}"


def classes(objects: list[tuple[Path, Dataset]]) -> list[str]:
    return sorted(str(ds.SOPClassUID) for _, ds in objects)


def sc_pixels(node: Node, sop_uid: str) -> np.ndarray:
    (sc,) = [ds for _, ds in objects_for(node, {sop_uid}) if ds.SOPClassUID == SC_CLASS]
    return sc.pixel_array.astype(np.float64)


def processed(results: dict[str, dict[str, Any]], uid: str) -> dict[str, Any]:
    assert uid in results, f"no result for {uid}"
    result = results[uid]
    assert result["status"] in PROCESSED, f"{uid}: {result['status']} ({result.get('reason')})"
    return result


def same_result(a: dict[str, Any], b: dict[str, Any], *, tolerance: float) -> None:
    assert a["status"] == b["status"], (a["status"], b["status"])
    assert abs(float(a["score"]) - float(b["score"])) <= tolerance, (a["score"], b["score"])


def process_file_case(node: Node, cases: Path, script: str, tmp_path: Path
                      ) -> tuple[dict[str, Dataset], dict[str, dict[str, Any]]]:
    """Generate, send (all Success), settle; return sources by file stem and their results."""
    files = generate(cases, script, tmp_path / script)
    sources = {p.stem: dcmread(p) for p in files}
    statuses = send(node, files)
    assert all(s == 0x0000 for s in statuses.values()), statuses
    node.settle([str(ds.SOPInstanceUID) for ds in sources.values()
                 if "PixelData" in ds])
    results: dict[str, dict[str, Any]] = {}
    for study in {str(ds.StudyInstanceUID) for ds in sources.values()}:
        results.update(node.results(study))
    return sources, results


# --------------------------------------------------------------------------- file cases


def test_f01_leading_zero_uids_are_carried_verbatim(node: Node, cases: Path,
                                                    tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F01", tmp_path)
    assert len(sources) == 2
    # the study summary SR references both images: every source UID may be carried
    carried = frozenset(
        str(getattr(src, k)) for src in sources.values()
        for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
    )
    for src in sources.values():
        sop, series, study = (str(src.SOPInstanceUID), str(src.SeriesInstanceUID),
                              str(src.StudyInstanceUID))
        processed(results, sop)
        objects = objects_for(node, {sop})
        assert SR_CLASS in classes(objects) and SC_CLASS in classes(objects), classes(objects)
        for _, obj in objects:
            assert obj.StudyInstanceUID == study, (obj.Modality, obj.StudyInstanceUID, study)
            assert sop in ui_values(obj), obj.Modality
            for item in obj.get("ReferencedSeriesSequence", []):  # GSPS (and any other)
                assert item.SeriesInstanceUID == series, (obj.Modality, item.SeriesInstanceUID)
        srs = [o for _, o in objects if o.SOPClassUID == SR_CLASS]
        (sr,) = [o for o in srs if o.get("SeriesNumber") != 9900]  # the image's own SR
        assert all(o.StudyInstanceUID == study for o in srs)  # and the study summary
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == study
        refs = {(str(s.SeriesInstanceUID), str(i.ReferencedSOPInstanceUID))
                for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
        assert (series, sop) in refs, refs
        (sc,) = [o for _, o in objects if o.SOPClassUID == SC_CLASS]
        sc_refs = {str(i.ReferencedSOPInstanceUID)
                   for key in ("SourceImageSequence", "ReferencedImageSequence")
                   for i in sc.get(key, [])}
        assert sop in sc_refs, sc_refs
        check_dciodvfy(objects, carried=carried)


def test_f02_voi_lut_8bit_layouts_display_alike(node: Node, cases: Path, tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F02", tmp_path)
    uid = {name: str(ds.SOPInstanceUID) for name, ds in sources.items()}
    control = processed(results, uid["F02_c_16bit_control"])
    for name in ("F02_a_8bit_one_per_word", "F02_b_8bit_packed"):
        same_result(processed(results, uid[name]), control, tolerance=0.01)
        diff = np.abs(sc_pixels(node, uid[name]) - sc_pixels(node, uid["F02_c_16bit_control"]))
        assert diff.mean() <= 1.0, f"{name}: SC overlay differs by {diff.mean():.2f} grey levels"
    check_dciodvfy(objects_for(node, set(uid.values())))


def test_f03_modality_lut_12bit_entries(node: Node, cases: Path, tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F03", tmp_path)
    a = str(sources["F03_a_modality_lut_12bit"].SOPInstanceUID)
    b = str(sources["F03_b_modality_lut_16bit"].SOPInstanceUID)
    same_result(processed(results, a), processed(results, b), tolerance=0.01)
    diff = np.abs(sc_pixels(node, a) - sc_pixels(node, b))
    assert diff.mean() <= 1.0, f"SC overlays differ by {diff.mean():.2f} grey levels"
    check_dciodvfy(objects_for(node, {a, b}))


def test_f06_rescale_slope_zero_is_identity_with_a_note(node: Node, cases: Path,
                                                        tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F06", tmp_path)
    a = str(sources["F06_a_slope_zero"].SOPInstanceUID)
    b = str(sources["F06_b_control"].SOPInstanceUID)
    same_result(processed(results, a), processed(results, b), tolerance=0.01)
    assert "rescale slope 0 is invalid: modality transform ignored" in node.log.read_text()
    check_dciodvfy(objects_for(node, {a, b}))


def test_f07_study_with_non_images(node: Node, cases: Path, tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F07", tmp_path)
    image = str(sources["F07_1_dx_ap"].SOPInstanceUID)
    others = {str(sources[n].SOPInstanceUID) for n in ("F07_2_rdsr", "F07_3_gsps", "F07_4_ko")}
    result = processed(results, image)
    objects = objects_for(node, {image})
    assert SR_CLASS in classes(objects) and SC_CLASS in classes(objects), classes(objects)
    assert not objects_for(node, others), "result objects reference the non-image objects"
    assert not set(results) & others, {u: results[u] for u in set(results) & others}
    assert all(node.store.job_state(u) != "not_processed" for u in others)
    study = str(sources["F07_1_dx_ap"].StudyInstanceUID)
    expected = study_priority([(image, CascadeResult.from_json(result))]).level  # F07_1 alone
    if result["status"] == "negative":
        assert expected is Status.NEGATIVE
    (row,) = [r for r in node.worklist() if r["study_instance_uid"] == study]
    assert row["n_images"] == 1 and row["n_not_processed"] == 0, row
    assert row["priority"] == expected.value, row  # the verdict vocabulary of image results
    # the study priority is stated by the study summary SR (series 9900), not the image's SR
    srs = [o for _, o in objects if o.SOPClassUID == SR_CLASS]
    (summary,) = [o for o in srs if o.get("SeriesNumber") == 9900]
    (image_sr,) = [o for o in srs if o.get("SeriesNumber") != 9900]

    def stated(sr: Dataset) -> list[tuple[str, str]]:
        return [
            (str(item.ConceptCodeSequence[0].CodeValue),
             str(item.ConceptCodeSequence[0].CodingSchemeDesignator))
            for item in _content_items(sr)
            if item.get("ValueType") == "CODE"
            and item.ConceptNameCodeSequence[0].CodeValue == codes.STUDY_PRIORITY.value
        ]

    want = codes.PRIORITY_CODES[expected]
    assert stated(summary) == [(want.value, want.scheme_designator)], stated(summary)
    assert stated(image_sr) == []
    check_dciodvfy(objects)


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _pn_groups(ds: Dataset) -> list[tuple[str, str]]:
    found = []
    for elem in ds.iterall():
        if elem.VR == "PN" and elem.value:
            for value in (elem.value if elem.VM > 1 else [elem.value]):
                found += [(elem.keyword, g) for g in str(PersonName(value)).split("=")]
    return found


def test_f08_person_name_groups_within_64(node: Node, cases: Path, tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F08", tmp_path)
    sop = str(sources["F08_long_names"].SOPInstanceUID)
    processed(results, sop)
    objects = objects_for(node, {sop})
    assert SR_CLASS in classes(objects) and SC_CLASS in classes(objects), classes(objects)
    for _, obj in objects:
        groups = _pn_groups(obj)
        assert any(k == "PatientName" for k, _ in groups), obj.Modality
        for keyword, group in groups:
            assert len(group) <= 64, f"{obj.Modality} {keyword}: {len(group)} characters"
    check_dciodvfy(objects)


F12_EXPECTED = {
    "F12_a_korean": ("Hong^Gildong=洪^吉洞=홍^길동", "요추 2방향"),
    "F12_b_japanese": ("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "腰椎 2方向"),
}


def test_f12_iso2022_names_carried_into_utf8(node: Node, cases: Path, tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F12", tmp_path)
    assert set(sources) == set(F12_EXPECTED)
    for name, (pn, description) in F12_EXPECTED.items():
        sop = str(sources[name].SOPInstanceUID)
        processed(results, sop)
        objects = objects_for(node, {sop})
        assert SR_CLASS in classes(objects) and SC_CLASS in classes(objects), classes(objects)
        for _, obj in objects:
            charset = obj.SpecificCharacterSet
            assert (charset if isinstance(charset, str) else list(charset)) == "ISO_IR 192"
            assert str(obj.PatientName) == pn, (obj.Modality, str(obj.PatientName))
            assert str(obj.StudyDescription) == description, (obj.Modality, obj.StudyDescription)
        check_dciodvfy(objects)


def test_f13_rle_with_delimiter_bytes_decodes_exactly(node: Node, cases: Path,
                                                      tmp_path: Path) -> None:
    sources, results = process_file_case(node, cases, "F13", tmp_path)
    rle = str(sources["F13_rle_cr_mono1"].SOPInstanceUID)
    control = str(sources["F13_control_uncompressed"].SOPInstanceUID)
    got, want = processed(results, rle), processed(results, control)
    assert got.get("reason") is None
    same_result(got, want, tolerance=1e-4)
    # the node's own decoding of the two files is identical, pixel for pixel
    rle_pixels = decode(dcmread(tmp_path / "F13" / "F13_rle_cr_mono1.dcm")).pixels
    control_pixels = decode(dcmread(tmp_path / "F13" / "F13_control_uncompressed.dcm")).pixels
    np.testing.assert_array_equal(rle_pixels, control_pixels)
    diff = np.abs(sc_pixels(node, rle) - sc_pixels(node, control))
    assert diff.mean() <= 1.0, f"SC overlays differ by {diff.mean():.2f} grey levels"
    check_dciodvfy(objects_for(node, {rle, control}))


# --------------------------------------------------------------------------- network cases


def _ctx_outcome(output: str, label: str) -> str:
    match = re.search(rf"^ctx {label} .*?-> (.+?)\s+\[expected", output, re.MULTILINE)
    assert match, f"no line for context {label} in:\n{output}"
    return match.group(1)


def test_f10_lossless_chosen_and_accepted_syntaxes_decodable(node: Node, cases: Path,
                                                             tmp_path: Path) -> None:
    output = run_network_case(cases, "F10", node, tmp_path / "F10")
    lossless = JPEGLosslessSV1.name
    assert _ctx_outcome(output, "A") == lossless
    assert _ctx_outcome(output, "B") == lossless
    assert _ctx_outcome(output, "D") == ExplicitVRLittleEndian.name
    lossy = dcmread(tmp_path / "F10" / "F10_jpeg_extended_dx.dcm")
    plain = dcmread(tmp_path / "F10" / "F10_uncompressed_dx.dcm")
    sent_lossy = f"sent JPEG Extended image {lossy.SOPInstanceUID}: status 0x0000" in output
    c_outcome = _ctx_outcome(output, "C")
    if c_outcome == "rejected":
        assert not sent_lossy
    else:  # accepted only because the node decodes 12-bit lossy JPEG (DCMTK dcmdjpeg)
        assert c_outcome == JPEGExtended12Bit.name, c_outcome
        assert sent_lossy, output
    assert f"sent uncompressed image {plain.SOPInstanceUID}: status 0x0000" in output
    uids = [str(plain.SOPInstanceUID)] + ([str(lossy.SOPInstanceUID)] if sent_lossy else [])
    node.settle(uids)
    results = node.results(str(plain.StudyInstanceUID))
    processed(results, str(plain.SOPInstanceUID))
    if sent_lossy:
        # The case's 12-bit codestream is pydicom's JPGExtended.dcm, a 1024 x 256 nuclear
        # medicine whole-body scan under a made-up "DX, LSPINE" header. The node must decode
        # it exactly (no decoding reason); the content gate may then say, with its reason,
        # that it is no spine radiograph (a real spine image in 4.51 is processed: see
        # test_f10_kind_spine_radiograph_in_jpeg_extended_is_processed).
        result = results[str(lossy.SOPInstanceUID)]
        if result["status"] not in PROCESSED:
            assert result["status"] == "not_processed", result
            assert "does not look like a spine radiograph" in str(result["reason"]), result
        reference = tmp_path / "F10" / "dcmdjpeg.dcm"
        subprocess.run(["dcmdjpeg", str(tmp_path / "F10" / "F10_jpeg_extended_dx.dcm"),
                        str(reference)], check=True, capture_output=True, timeout=120)
        np.testing.assert_array_equal(decode(lossy).pixels, decode(dcmread(reference)).pixels)
    check_dciodvfy(objects_for(node, set(uids)))


def test_f10_kind_spine_radiograph_in_jpeg_extended_is_processed(node: Node, cases: Path,
                                                                 tmp_path: Path) -> None:
    """The kind behind F10: a real spine image sent in 12-bit JPEG Extended (4.51), in a
    context that offers nothing else, is accepted, decoded and processed like its
    uncompressed original (DCMTK ``dcmcjpeg +ee`` makes the lossy file)."""
    run_network_case(cases, "F10", node, tmp_path / "F10")
    plain = tmp_path / "F10" / "F10_uncompressed_dx.dcm"
    lossy_path = tmp_path / "spine_4_51.dcm"
    subprocess.run(["dcmcjpeg", "+ee", "+bt", "+ua", str(plain), str(lossy_path)],
                   check=True, capture_output=True, timeout=120)
    lossy = dcmread(lossy_path)
    assert lossy.file_meta.TransferSyntaxUID == JPEGExtended12Bit
    assert int(lossy.BitsStored) == 12
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(str(lossy.SOPClassUID), [JPEGExtended12Bit])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established, "the node refused the association"
    try:
        accepted = [c.transfer_syntax[0] for c in assoc.accepted_contexts]
        assert accepted == [JPEGExtended12Bit], accepted
        rsp = assoc.send_c_store(lossy)
        assert int(rsp.Status) == 0x0000, rsp
    finally:
        assoc.release()
    uid = str(lossy.SOPInstanceUID)
    node.settle([uid, str(dcmread(plain).SOPInstanceUID)])
    results = node.results(str(lossy.StudyInstanceUID))
    got = processed(results, uid)
    want = processed(results, str(dcmread(plain).SOPInstanceUID))
    same_result(got, want, tolerance=0.05)  # lossy: the same call, scores close
    check_dciodvfy(objects_for(node, {uid}))


def test_f14_abort_mid_transfer_then_resend(node: Node, cases: Path, tmp_path: Path) -> None:
    output = run_network_case(cases, "F14", node, tmp_path / "F14")
    assert re.search(r"^1: aborted after \d+ P-DATA PDUs; C-STORE response: no response",
                     output, re.MULTILINE), output
    assert re.search(r"^2: C-STORE status 0x0000", output, re.MULTILINE), output
    assert re.search(r"^3: C-STORE status 0x0000", output, re.MULTILINE), output
    sop = str(dcmread(tmp_path / "F14" / "F14_large_dx.dcm", stop_before_pixels=True)
              .SOPInstanceUID)
    node.settle([sop])
    incoming = node.settings.spool_dir / ".incoming"
    assert not incoming.exists() or not any(incoming.iterdir()), list(incoming.iterdir())
    study = str(dcmread(tmp_path / "F14" / "F14_large_dx.dcm",
                        stop_before_pixels=True).StudyInstanceUID)
    rows = [uid for uid, _ in node.store.study_results(study)]
    assert rows == [sop], rows  # one instance, one job, one result
    processed(node.results(study), sop)
    objects = objects_for(node, {sop})
    sops = [str(ds.SOPInstanceUID) for _, ds in objects]
    assert len(sops) == len(set(sops)), "a result object reached the PACS twice"
    series_numbers = [ds.get("SeriesNumber") for _, ds in objects if ds.SOPClassUID == SR_CLASS]
    assert sorted(series_numbers) == [9900, 9901], series_numbers  # study summary + image SR
    check_dciodvfy(objects)


def test_f15_private_sop_classes_accepted_and_ignored(node: Node, cases: Path,
                                                      tmp_path: Path) -> None:
    output = run_network_case(cases, "F15", node, tmp_path / "F15")
    out = tmp_path / "F15"
    privates = [dcmread(p) for p in sorted(out.glob("F15_private_*.dcm"))]
    image = dcmread(out / "F15_dx.dcm")
    assert len(privates) == 2
    for ds in privates:
        assert f"context {ds.SOPClassUID}: accepted" in output, output
        assert f"private {ds.SOPClassUID}: status 0x0000" in output, output
    assert f"DX {image.SOPInstanceUID}: status 0x0000" in output, output
    sop = str(image.SOPInstanceUID)
    node.settle([sop])
    results = node.results(str(image.StudyInstanceUID))
    processed(results, sop)
    private_uids = {str(ds.SOPInstanceUID) for ds in privates}
    for uid in private_uids:
        assert node.store.job_state(uid) is None, f"a job was made for private object {uid}"
    assert not set(results) & private_uids
    assert not objects_for(node, private_uids), "result objects made for the private objects"
    check_dciodvfy(objects_for(node, {sop}))
