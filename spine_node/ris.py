"""Tell the RIS about a study the AI ignores: none of its objects is analysed.

A study with an analysed image is told by its study summary revisions (``study_report``).
When the receiver records an object without a job (not an image, or an image outside the
intended use without ``report_out_of_scope``) and the study has no job and no HL7 message
yet, each HL7 destination gets one ORU^R01 with the flag "Ignored" and the reason
(``oru.build_ignored_oru``), queued through the same outbox. If an image of the study is
analysed later, its revision's message is newer and supersedes this one (``Dispatcher``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from pydicom import dcmread

from spine_node.oru import Hl7Header, StudyIdentity, build_ignored_oru, control_id
from spine_node.results.reference import reference_dataset
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, JobStore, Monitor, SendSpec

logger = logging.getLogger(__name__)


def ignored_key(study_instance_uid: str) -> str:
    """The outbound key of a study's "ignored" message (one per study and destination)."""
    return f"hl7-ignored:{study_instance_uid}"[:128]


class IgnoredStudyReporter:
    """Queues the "ignored" ORU^R01 of a study for every HL7 destination.

    Parameters
    ----------
    store : JobStore
        The queue.
    outbox_dir : pathlib.Path
        Where the messages are written.
    hl7_headers : Mapping of str to Hl7Header
        The MSH values of each HL7 destination, by name.
    """

    def __init__(
        self, store: JobStore, outbox_dir: Path, hl7_headers: Mapping[str, Hl7Header]
    ) -> None:
        self.store = store
        self.outbox_dir = outbox_dir
        self.hl7_headers = dict(hl7_headers)

    def report(self, study_instance_uid: str, source: Path, reason: str) -> bool:
        """Queue the study's "ignored" message unless it has a job or an HL7 message already.

        Parameters
        ----------
        study_instance_uid : str
            As received.
        source : pathlib.Path
            The object just stored (patient and order attributes are read from it).
        reason : str
            Why it is not analysed.

        Returns
        -------
        bool
            True when messages were queued.
        """
        if not self.hl7_headers or Monitor(self.store).study_known_to_ris(study_instance_uid):
            return False
        reference = reference_dataset(dcmread(source, stop_before_pixels=True, force=True))
        identity = StudyIdentity.of(study_instance_uid, reference)
        key = ignored_key(study_instance_uid)
        now = datetime.now().astimezone()
        sends = []
        for name, header in self.hl7_headers.items():
            message = build_ignored_oru(
                header, identity, reason, message_control_id=control_id(name, key), now=now
            )
            relative = relative_name(f"{name}\0{key}", ".hl7")
            write_durable(self.outbox_dir, relative, header.encode(message))
            sends.append(SendSpec(name, DestinationKind.HL7, key, relative, study_instance_uid))
        self.store.add_sends(sends)
        logger.info(
            "study ignored (%s): HL7 message queued for %s",
            reason,
            ", ".join(self.hl7_headers),
            extra={"study_instance_uid": study_instance_uid},
        )
        return True
