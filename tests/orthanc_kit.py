"""A real Orthanc (Debian package) on loopback for integration tests, read through its REST API.

Orthanc runs from a JSON configuration written into a temporary directory: storage and index
there, free HTTP and DICOM ports, no plugins, no authentication, HTTP reachable from this
machine only. Only ``urllib`` is used, against ``127.0.0.1``.

Also here: :class:`ScriptedCascade`, a stand-in for the model cascade that answers what a test
scripted (positive with findings, negative, not processed, or an error once), so the result
paths that random tiny weights rarely reach (GSPS, abnormal priority) run for real.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset

from spine_node import imaging
from spine_node.analyze import demo_bundle_dir
from spine_node.models.bundle import manifest_from_json
from spine_node.results.types import CascadeResult, Finding, ModelInfo, Status
from tests.nodekit import free_port

ORTHANC_BINARY = "/usr/sbin/Orthanc"


def orthanc_binary() -> str | None:
    """Path of the Orthanc server binary, or None when it is not installed."""
    if Path(ORTHANC_BINARY).is_file():
        return ORTHANC_BINARY
    return shutil.which("Orthanc")


class Orthanc:
    """One Orthanc server in ``work_dir``, started with :meth:`start`, stopped with :meth:`stop`.

    Parameters
    ----------
    work_dir : pathlib.Path
        Holds the configuration, the storage, the index and the log.
    aet : str
        Orthanc's DICOM AE title.
    modalities : Mapping[str, Mapping[str, Any]], optional
        ``DicomModalities`` entries (name -> ``{"AET", "Host", "Port", ...}``): the peers
        Orthanc opens associations to, e.g. to send Storage Commitment reports.
    lua : str, optional
        A Lua script Orthanc runs (``LuaScripts``), e.g. a ``ReceivedInstanceFilter``.
    """

    def __init__(
        self,
        work_dir: Path,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Mapping[str, Any]] | None = None,
        lua: str | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.aet = aet
        self.modalities = {k: dict(v) for k, v in (modalities or {}).items()}
        self.lua = lua
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # no proxy: a test must reach this Orthanc on loopback even where http_proxy is set
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.log_path = self.work_dir / "orthanc.log"

    @property
    def base_url(self) -> str:
        """Root of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is started with."""
        return {
            "Name": "spine-node-test",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": self.modalities,
            "OrthancPeers": {},
            "Plugins": [],
            "HttpsVerifyPeers": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "OverwriteInstances": False,
            "StableAge": 1,
            "LuaScripts": [str(self.work_dir / "script.lua")] if self.lua else [],
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Write the configuration, start Orthanc and wait until ``/system`` answers.

        Raises
        ------
        FileNotFoundError
            When Orthanc is not installed.
        RuntimeError
            When Orthanc exits or does not answer within ``timeout`` seconds.
        """
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "orthanc.json"
        if self.lua:
            (self.work_dir / "script.lua").write_text(self.lua)
        config.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.proc = subprocess.Popen(
                [binary, "--no-jobs", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with status {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 20 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        """The end of Orthanc's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return "(no log)"

    # -- REST ------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` and return the decoded JSON."""
        with self._http.open(self.base_url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes, content_type: str = "application/dicom") -> Any:
        """POST ``body`` to ``path`` and return the decoded JSON."""
        request = urllib.request.Request(
            self.base_url + path, data=body, method="POST", headers={"Content-Type": content_type}
        )
        with self._http.open(request, timeout=30) as response:
            return json.loads(response.read())

    def put(self, path: str, body: Mapping[str, Any]) -> None:
        """PUT a JSON body to ``path`` (e.g. ``/modalities/{name}``)."""
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with self._http.open(request, timeout=30) as response:
            response.read()

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through ``POST /instances``; return Orthanc's answer."""
        answer: dict[str, Any] = self.post("/instances", Path(path).read_bytes())
        return answer

    def instance_count(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.get("/statistics")["CountInstances"])

    def studies(self) -> list[str]:
        """Orthanc identifiers of every study."""
        return list(self.get("/studies"))

    def study_uid(self, study_id: str) -> str:
        """The StudyInstanceUID of an Orthanc study."""
        return str(self.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"])

    def series_of(self, study_id: str) -> list[dict[str, Any]]:
        """The series of a study as Orthanc describes them (``/studies/{id}/series``)."""
        return list(self.get(f"/studies/{study_id}/series"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """Simplified tags of one instance (``/instances/{id}/tags?simplify``)."""
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/tags?simplify")
        return tags

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc identifier of the study with this StudyInstanceUID (None when absent)."""
        for study_id in self.studies():
            if self.study_uid(study_id) == study_instance_uid:
                return study_id
        return None


# -- a scripted stand-in for the cascade --------------------------------------------------------


@dataclass(frozen=True)
class Scripted:
    """What :class:`ScriptedCascade` answers for one image or study."""

    status: Status
    score: float | None = None
    reason: str | None = None
    findings: tuple[Finding, ...] = ()


#: A positive answer with two findings inside a 256 x 320 image.
POSITIVE = Scripted(
    Status.POSITIVE,
    0.9,
    findings=(
        Finding("Osteophytes", 0.8, (20.0, 30.0, 120.0, 150.0)),
        Finding("Spondylolysthesis", 0.6, (60.0, 160.0, 200.0, 260.0), grade="I"),
    ),
)
NEGATIVE = Scripted(Status.NEGATIVE, 0.1)
NOT_PROCESSED = Scripted(Status.NOT_PROCESSED, reason="not a spine radiograph (scripted)")

#: The embedded demo bundle's decision threshold (from its manifest; the node has no default).
DEMO_THRESHOLD = manifest_from_json(
    json.loads((demo_bundle_dir() / "manifest.json").read_text(encoding="utf-8"))
).threshold


class ScriptedCascade:
    """Implements the worker's ``CascadeLike``: ``model_info`` and ``analyze(datasets)``.

    Parameters
    ----------
    script : Mapping[str, Scripted]
        Answers keyed by SOP Instance UID or by Study Instance UID (the SOP key wins).
    default : Scripted
        Answer for images the script does not name.
    fail_once : iterable of str
        SOP Instance UIDs whose first analysis raises (a transient cascade error).
    threshold : float
        The bundle's decision threshold stated in every result and in ``model_info``
        (the demo bundle's manifest value unless a test states another).
    """

    def __init__(
        self,
        script: Mapping[str, Scripted],
        default: Scripted = NEGATIVE,
        fail_once: Iterable[str] = (),
        threshold: float = DEMO_THRESHOLD,
    ) -> None:
        self.threshold = threshold
        self.model_info = ModelInfo(name="scripted-cascade", version="1.0.0",
                                    parameters={"threshold": threshold})
        self.script = dict(script)
        self.default = default
        self.fail_once = set(fail_once)
        self.calls: list[list[str]] = []

    def analyze(self, datasets: Sequence[Dataset]) -> list[CascadeResult]:
        """Return the scripted result of each dataset (or raise for a ``fail_once`` image)."""
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        self.calls.append(uids)
        failing = self.fail_once.intersection(uids)
        if failing:
            self.fail_once -= failing
            raise RuntimeError(f"scripted transient failure for {sorted(failing)}")
        results = []
        for ds, uid in zip(datasets, uids, strict=True):
            answer = self.script.get(uid) or self.script.get(str(ds.StudyInstanceUID))
            answer = answer or self.default
            results.append(
                CascadeResult(
                    sop_instance_uid=uid,
                    status=answer.status,
                    reason=answer.reason,
                    score=answer.score,
                    threshold=self.threshold,
                    findings=answer.findings,
                    member_scores={} if answer.score is None else {"scripted": answer.score},
                    display=_display(ds),
                )
            )
        return results


def _display(ds: Dataset) -> imaging.SourceImage | None:
    """The display image the real cascade hands on with its result (None if undecodable)."""
    try:
        return imaging.decode(ds)
    except Exception:  # the real cascade reports these "not decoded"
        return None
