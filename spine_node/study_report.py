"""Keep a study's priority true: the study summary SR, the HL7 ORU and the webhook, from one
study state.

After each finished image the worker calls :meth:`StudyReporter.report`. In one transaction
the store reads every analysed image of the study and opens a new summary revision when the
study's analysed images or their outcomes changed (``JobStore.advance_study`` with ``images_key``);
the reporter then builds that
revision's SR (``results.study``, amending the previous revision), one HL7 ORU^R01 per HL7
destination (``oru``) and the webhook body from the same snapshot, writes them to the outbox
and queues their sends (HL7 before webhooks, so that a webhook posted in the same sweep sees
the RIS answer), unless a newer revision
was opened meanwhile (``JobStore.queue_study_document``). The worklist ranks studies with the
same function (``results.priority.study_priority``) over the same stored results.

The report holds by construction: recording an image's result marks the study's report owed
in the same transaction (``JobStore.complete_job``); the report clears the mark in the
transaction that queues the revision or finds nothing changed. A report that failed or never
ran (the worker died) is made by an idle worker (``Worker.report_owed``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from spine_node.oru import Hl7Header, StudyIdentity, build_oru, control_id
from spine_node.results.options import ResultOptions
from spine_node.results.priority import study_priority
from spine_node.results.reference import reference_dataset
from spine_node.results.study import (
    Predecessor,
    StudyImageResult,
    build_study_sr,
    priority_key,
)
from spine_node.results.types import CascadeResult, ModelInfo
from spine_node.spool import relative_name, write_durable
from spine_node.store import (
    DestinationKind,
    DestinationRef,
    JobStore,
    SendSpec,
    StudyImage,
    StudySnapshot,
)
from spine_node.worker import encode_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyReportSettings:
    """Where study documents go.

    Attributes
    ----------
    destinations : tuple of DestinationRef
        Every configured destination: DICOM peers get the study summary SR, HL7
        destinations an ORU^R01, webhooks the study state as JSON (one document, one send
        per destination).
    hl7_headers : Mapping of str to Hl7Header
        The MSH values of each HL7 destination, by name.
    """

    destinations: tuple[DestinationRef, ...]
    hl7_headers: Mapping[str, Hl7Header] = field(default_factory=dict)


def images_key(images: Sequence[StudyImage]) -> str:
    """What opens a new summary revision: what the summary states.

    The study's priority (``results.study.priority_key``) and every analysed image with its
    outcome, so that the current revision always references all analysed images of the
    study: a new image, or a new outcome for one (re-analysis), amends the summary.

    Returns
    -------
    str
        ``"<priority>:<sha256 hex of the sorted image outcomes>"``, at most 128 characters
        (the store's column), however many images the study has.
    """
    results = [(i.sop_instance_uid, CascadeResult.from_json(i.payload)) for i in images]
    outcomes = sorted(f"{uid}={result.status.value}" for uid, result in results)
    digest = hashlib.sha256("|".join(outcomes).encode()).hexdigest()
    return f"{priority_key(results)}:{digest}"


class StudyReporter:
    """Builds and queues study summary revisions.

    Parameters
    ----------
    store : JobStore
        The queue (study state and sends).
    outbox_dir : pathlib.Path
        Where documents and webhook bodies are written.
    model : ModelInfo
        The bundle in use.
    options : ResultOptions
        Series numbers and descriptions.
    settings : StudyReportSettings
        Destinations and webhook.
    """

    def __init__(
        self,
        store: JobStore,
        outbox_dir: Path,
        model: ModelInfo,
        options: ResultOptions,
        settings: StudyReportSettings,
    ) -> None:
        self.store = store
        self.outbox_dir = outbox_dir
        self.model = model
        self.options = options
        self.settings = settings

    def report(self, study_instance_uid: str, source: Dataset) -> StudySnapshot:
        """Send a new summary revision of the study when its state changed.

        Clears the study's owed report (``study_states.report_due_at``) when it queued the
        revision or found nothing changed, unless a result was recorded meanwhile.

        Parameters
        ----------
        study_instance_uid : str
            As received (the store's key).
        source : pydicom.Dataset
            An image of the study (patient and study attributes for the document).

        Returns
        -------
        StudySnapshot
            The state read; ``changed`` tells whether a revision was built.
        """
        snapshot = self.store.advance_study(study_instance_uid, images_key)
        if not snapshot.changed:
            return snapshot
        images = [
            StudyImageResult(
                i.sop_instance_uid,
                i.series_instance_uid,
                i.sop_class_uid,
                CascadeResult.from_json(i.payload),
            )
            for i in snapshot.images
        ]
        predecessor = (
            Predecessor(snapshot.previous_document_uid, snapshot.previous_document_series_uid)
            if snapshot.previous_document_uid and snapshot.previous_document_series_uid
            else None
        )
        reference = reference_dataset(source)
        sr = build_study_sr(
            reference,
            images,
            self.model,
            self.options,
            revision=snapshot.revision,
            predecessor=predecessor,
        )
        uid = str(sr.SOPInstanceUID)
        relative = relative_name(uid)
        write_durable(self.outbox_dir, relative, encode_dataset(sr))
        study = snapshot.study_instance_uid
        sends = [
            SendSpec(d.name, d.kind, uid, relative, study)
            for d in self.settings.destinations
            if d.kind is DestinationKind.DICOM
        ]
        for dest in self.settings.destinations:
            if dest.kind is DestinationKind.HL7:
                key, path = self._hl7_message(snapshot, reference, uid, dest.name)
                sends.append(SendSpec(dest.name, dest.kind, key, path, study))
        hooks = [d for d in self.settings.destinations if d.kind is DestinationKind.WEBHOOK]
        if hooks:
            hook_uid, hook_path = self._webhook_body(snapshot, uid)
            sends += [SendSpec(d.name, d.kind, hook_uid, hook_path, study) for d in hooks]
        queued = self.store.queue_study_document(
            study_instance_uid,
            snapshot.revision,
            uid,
            str(sr.SeriesInstanceUID),
            sends,
            snapshot.report_due_seq,
        )
        logger.info(
            "study summary revision %d (%s) %s",
            snapshot.revision,
            uid,
            "queued" if queued else "not queued (superseded, or queued by another worker)",
        )
        return snapshot

    def _hl7_message(
        self, snapshot: StudySnapshot, reference: Dataset, document_uid: str, destination: str
    ) -> tuple[str, str]:
        """Write this revision's ORU^R01 for one HL7 destination; return its key and path."""
        header = self.settings.hl7_headers.get(destination)
        if header is None:
            raise ValueError(f"HL7 destination {destination!r} has no MSH values configured")
        results = [CascadeResult.from_json(i.payload) for i in snapshot.images]
        priority = study_priority(
            [(i.sop_instance_uid, r) for i, r in zip(snapshot.images, results, strict=True)]
        )
        message = build_oru(
            header,
            StudyIdentity.of(snapshot.study_instance_uid, reference),
            priority,
            results,
            self.model,
            revision=snapshot.revision,
            message_control_id=control_id(destination, document_uid),
            now=datetime.now().astimezone(),
        )
        key = f"hl7:{snapshot.study_instance_uid}:{snapshot.revision}"
        if len(key) > 128:  # the store's column; a received "UID" may be anything
            digest = hashlib.sha256(snapshot.study_instance_uid.encode()).hexdigest()
            key = f"hl7:sha256:{digest}:{snapshot.revision}"
        relative = relative_name(f"{destination}\0{key}", ".hl7")
        write_durable(self.outbox_dir, relative, header.encode(message))
        return key, relative

    def _webhook_body(self, snapshot: StudySnapshot, document_uid: str) -> tuple[str, str]:
        """Write the webhook body of this revision; return its key and outbox path."""
        pairs = [(i.sop_instance_uid, CascadeResult.from_json(i.payload)) for i in snapshot.images]
        priority = study_priority(pairs)
        body: dict[str, Any] = {
            "study_instance_uid": snapshot.study_instance_uid,
            "revision": snapshot.revision,
            "study_summary_sop_instance_uid": document_uid,
            "priority": priority.to_json(),
            "images": [
                {**i.payload, "sop_instance_uid": i.sop_instance_uid} for i in snapshot.images
            ],
            "model": {"name": self.model.name, "version": self.model.version},
        }
        hook_uid = f"webhook:{snapshot.study_instance_uid}:{snapshot.revision}"
        relative = relative_name(hook_uid, ".json")
        write_durable(self.outbox_dir, relative, json.dumps(body, sort_keys=True).encode())
        return hook_uid, relative
