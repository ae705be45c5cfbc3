"""Storage Commitment Push Model (PS3.4 Annex J) in the SCU role: the request and the report.

After storing result objects at a destination with ``storage_commitment``, the dispatcher
asks the peer to commit to keeping them: an N-ACTION (Action Type 1, "Request Storage
Commitment") on the Storage Commitment Push Model SOP Instance with a new Transaction UID
and the Referenced SOP Sequence of the objects. The peer answers with an N-EVENT-REPORT
(Event Type 1: every object committed; 2: some failed, each with a Failure Reason), either
on the same association while it is open or on a new association to the node, which then
accepts the Storage Commitment Push Model in the SCU role. :func:`handle_report` serves
both: it is bound to the dispatcher's association and to the receiver's, and records the
outcome through :class:`spine_node.store.Commitments`.

This module holds the DICOM side only (datasets, the report's meaning, the pynetdicom
handler); the wiring is in :mod:`spine_node.dispatcher` and :mod:`spine_node.receiver`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from spine_node.audit import AuditLog, AuditRecord, Direction
from spine_node.store import Commitments, DeliveryState, JobStore

logger = logging.getLogger(__name__)

__all__ = [
    "EVENT_ALL_COMMITTED",
    "EVENT_SOME_FAILED",
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "CommitmentReport",
    "Reference",
    "ReportContext",
    "announce_settled",
    "failure_text",
    "handle_report",
    "parse_report",
    "request_commitment",
    "request_dataset",
]

#: Storage Commitment Push Model SOP Class (PS3.4 J.3).
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: Its well-known SOP Instance, the N-ACTION's Requested SOP Instance (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: Action Type ID "Request Storage Commitment" (PS3.4 J.3.2.1).
REQUEST_ACTION_TYPE = 1
#: Event Type IDs of the report (PS3.4 J.3.3.1).
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2
#: Failure Reason (0008,1197) values (PS3.3 C.12.1.1.4), in words.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
#: N-EVENT-REPORT response statuses used (PS3.7 C).
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT_VALUE = 0x0115


def failure_text(reason: int | None) -> str:
    """A Failure Reason in words with its code (``"no such object instance (0x0112)"``)."""
    if reason is None:
        return "no failure reason given"
    return f"{FAILURE_REASONS.get(reason, 'failure')} (0x{reason:04X})"


@dataclass(frozen=True)
class Reference:
    """One object named in a request or a report (Referenced SOP Class / Instance UID)."""

    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("sop_class_uid", "sop_instance_uid"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            if not value:
                raise ValueError(f"{name} must not be empty")

    def to_json(self) -> dict[str, str]:
        """JSON form."""
        return {"sop_class_uid": self.sop_class_uid, "sop_instance_uid": self.sop_instance_uid}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        """Inverse of :meth:`to_json`."""
        return cls(str(data["sop_class_uid"]), str(data["sop_instance_uid"]))


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT of the Storage Commitment Push Model states.

    Attributes
    ----------
    transaction_uid : str
        The request's Transaction UID (0008,1195).
    committed : tuple of Reference
        Referenced SOP Sequence (0008,1199): objects the peer commits to keep.
    failed : tuple of (Reference, int or None)
        Failed SOP Sequence (0008,1198): objects it does not, with their Failure Reason.
    """

    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int | None], ...]

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "transaction_uid": self.transaction_uid,
            "committed": [r.to_json() for r in self.committed],
            "failed": [{**r.to_json(), "failure_reason": why} for r, why in self.failed],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CommitmentReport:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["transaction_uid"]),
            tuple(Reference.from_json(r) for r in data["committed"]),
            tuple(
                (
                    Reference.from_json(r),
                    None if r.get("failure_reason") is None else int(r["failure_reason"]),
                )
                for r in data["failed"]
            ),
        )


def request_dataset(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and Referenced SOP Sequence.

    Raises
    ------
    ValueError
        When ``transaction_uid`` is empty or ``references`` is empty.
    """
    if not transaction_uid:
        raise ValueError("transaction_uid must not be empty")
    if not references:
        raise ValueError("a commitment request names at least one object")
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def _references(info: Dataset, keyword: str) -> list[tuple[Reference, int | None]]:
    out = []
    for item in info.get(keyword, []):
        reason = item.get("FailureReason")
        ref = Reference(
            str(item.get("ReferencedSOPClassUID", "") or ""),
            str(item.get("ReferencedSOPInstanceUID", "") or ""),
        )
        out.append((ref, None if reason is None else int(reason)))
    return out


def parse_report(event_type: int | None, info: Dataset) -> CommitmentReport:
    """Read a Storage Commitment report.

    Parameters
    ----------
    event_type : int or None
        The N-EVENT-REPORT's Event Type ID (1 or 2).
    info : pydicom.Dataset
        Its Event Information.

    Raises
    ------
    ValueError
        An unknown event type, no Transaction UID, a reference without its UIDs, or a
        type-1 report that lists failures.
    """
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise ValueError(f"event type must be 1 or 2, got {event_type!r}")
    transaction_uid = str(info.get("TransactionUID", "") or "")
    if not transaction_uid:
        raise ValueError("the report has no Transaction UID")
    committed = tuple(ref for ref, _ in _references(info, "ReferencedSOPSequence"))
    failed = tuple(_references(info, "FailedSOPSequence"))
    if event_type == EVENT_ALL_COMMITTED and failed:
        raise ValueError("an event type 1 report (all committed) lists failed objects")
    return CommitmentReport(transaction_uid, committed, failed)


@dataclass(frozen=True)
class ReportContext:
    """What :func:`handle_report` needs, bound through ``evt_handlers``.

    Attributes
    ----------
    store : JobStore
        The queue holding the committing objects.
    max_requests : Mapping[str, int]
        Requests per object of each commitment destination
        (``Settings.commitment_destinations``): a failed object with requests left is sent
        again, otherwise it is dead.
    audit : AuditLog or None
        Where each reported object is recorded (outcome ``committed`` or
        ``commitment_failed``, the Transaction UID in the detail).
    """

    store: JobStore
    max_requests: Mapping[str, int]
    audit: AuditLog | None = None


def _audit(ctx: ReportContext, event: evt.Event, report: CommitmentReport) -> None:
    """One audit record per object the report names (the peer's words, as reported)."""
    if ctx.audit is None:
        return
    assoc = event.assoc
    other = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    outcomes = [(ref, "committed", "") for ref in report.committed] + [
        (ref, "commitment_failed", f"{failure_text(why)}; ") for ref, why in report.failed
    ]
    for ref, outcome, why in outcomes:
        ctx.audit.append(
            AuditRecord(
                time=AuditRecord.now(),
                direction=Direction.SENT,
                peer=f"{other.address}:{other.port}",
                calling_ae=str(assoc.requestor.ae_title).strip(),
                called_ae=str(assoc.acceptor.ae_title).strip(),
                sop_class_uid=ref.sop_class_uid,
                sop_instance_uid=ref.sop_instance_uid,
                study_instance_uid="",
                outcome=outcome,
                detail=f"{why}storage commitment transaction {report.transaction_uid}",
            )
        )


def announce_settled(
    store: JobStore, studies: Sequence[str], destinations: Collection[str]
) -> list[tuple[str, str]]:
    """Post a study's webhook again once its commitment is settled (``done`` or ``dead``).

    A webhook posted while the study's objects were committing said ``pending``; each study
    of ``studies`` whose commitment at ``destinations`` is now done or dead has its webhook
    queued once more (``JobStore.queue_webhook_update``, once per state and posted body).

    Returns
    -------
    list of (str, str)
        ``(study, state)`` of each study whose webhook was queued again.
    """
    if not studies or not destinations:
        return []
    queued = []
    for study, state in Commitments(store).study_states(destinations, list(studies)).items():
        if state in (DeliveryState.DONE.value, DeliveryState.DEAD.value) and (
            store.queue_webhook_update(study, f"commitment-{state}")
        ):
            queued.append((study, state))
            logger.info("storage commitment of a study is %s: its webhook is posted again",
                        state, extra={"study_instance_uid": study})
    return queued


def handle_report(event: evt.Event, ctx: ReportContext) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT: record a Storage Commitment report; answer its status.

    Returns
    -------
    (int, None)
        0x0000 once recorded (also for a transaction the node does not know: nothing is
        pending for it), 0x0113 for an unknown event type, 0x0115 for an unreadable report,
        0x0110 when the queue could not be written (the peer may report again).
    """
    other = event.assoc.requestor if event.assoc.is_acceptor else event.assoc.acceptor
    peer = f"{other.ae_title}@{other.address}"
    try:
        report = parse_report(event.event_type, event.event_information)
    except ValueError as exc:
        logger.warning("storage commitment report from %s refused: %s", peer, exc)
        if event.event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
            return STATUS_NO_SUCH_EVENT_TYPE, None
        return STATUS_INVALID_ARGUMENT_VALUE, None
    except Exception as exc:  # pydicom raises assorted errors on a corrupt data set
        logger.warning("storage commitment report from %s unreadable: %s", peer, exc)
        return STATUS_INVALID_ARGUMENT_VALUE, None
    try:
        counts = Commitments(ctx.store).record_report(
            report.transaction_uid,
            [r.sop_instance_uid for r in report.committed],
            {r.sop_instance_uid: failure_text(why) for r, why in report.failed},
            ctx.max_requests,
        )
    except Exception as exc:
        logger.error(
            "storage commitment report %s not recorded: %s", report.transaction_uid, exc
        )
        return STATUS_PROCESSING_FAILURE, None
    _audit(ctx, event, report)
    try:
        announce_settled(
            ctx.store,
            Commitments(ctx.store).studies_of(transaction_uid=report.transaction_uid),
            list(ctx.max_requests),
        )
    except Exception as exc:  # the report is recorded; the webhook update is best effort
        logger.warning("storage commitment report %s: webhook update not queued: %s",
                       report.transaction_uid, exc)
    log = logger.warning if counts["resend"] or counts["dead"] else logger.info
    log(
        "storage commitment report %s from %s: %d committed, %d failed (%d sent again, "
        "%d dead), %d not pending here",
        report.transaction_uid,
        peer,
        counts["committed"],
        len(report.failed),
        counts["resend"],
        counts["dead"],
        counts["unknown"],
        extra={"transaction_uid": report.transaction_uid},
    )
    return STATUS_SUCCESS, None


def request_commitment(
    assoc: Any, transaction_uid: str, references: Sequence[Reference]
) -> tuple[int | None, str]:
    """Send the N-ACTION on an established association.

    Returns
    -------
    (int or None, str)
        The N-ACTION status (None: no response) and, when not 0x0000, why in words.
    """
    info = request_dataset(transaction_uid, references)
    try:
        status, _reply = assoc.send_n_action(
            info,
            REQUEST_ACTION_TYPE,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_INSTANCE,
        )
    except (ValueError, RuntimeError) as exc:  # no accepted context, association gone
        return None, f"N-ACTION not sent: {exc}"
    code = int(status.Status) if "Status" in status else None
    if code == STATUS_SUCCESS:
        return code, ""
    return code, "N-ACTION: no response" if code is None else f"N-ACTION status 0x{code:04X}"
