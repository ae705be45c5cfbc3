"""The node's health as ``spine-node status`` and the web status page show it.

Queue counts, the oldest queued job and unsent object, dead letters, live workers, and the
problems found with their exit-code values (added up when several hold).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spine_node.config import Settings

if TYPE_CHECKING:
    from spine_node.store import JobStore

#: ``spine-node status`` exit codes; several problems add up (dead + no worker = 12).
STATUS_OK = 0
STATUS_DEAD = 4  # dead jobs or dead sends wait for an operator (spine-node replay)
STATUS_NO_WORKER = 8  # jobs are waiting and no worker has beaten within 3 heartbeats
STATUS_STALE_QUEUE = 16  # the oldest queued job or undelivered send is older than allowed


def status_report(settings: Settings, store: JobStore) -> dict[str, Any]:
    """Everything ``spine-node status`` shows, with the problems and the exit code.

    Parameters
    ----------
    settings : Settings
        ``heartbeat_s`` (a worker is live when seen within three) and
        ``status_max_queue_age_s``.
    store : JobStore
        The open queue.

    Returns
    -------
    dict
        :meth:`JobStore.status` plus ``dead`` (dead letters), ``oldest_pending_send_age_s``,
        ``delivery`` (:func:`delivery_report`),
        ``workers`` (each with ``live``), ``problems`` (``code``, ``problem``) and
        ``exit_code``.
    """
    from spine_node.store import Monitor

    report = store.status()
    report["dead"] = store.dead_letters()
    monitor = Monitor(store)
    live_age = 3 * settings.heartbeat_s
    workers = monitor.workers()
    report["oldest_pending_send_age_s"] = monitor.oldest_pending_send_age()
    report["delivery"] = delivery_report(
        monitor.study_delivery(commitment_destinations=settings.commitment_destinations)
    )
    for worker in workers:
        worker["live"] = worker["last_seen_age_s"] <= live_age
    report["workers"] = workers
    jobs = report["jobs"]
    waiting = jobs.get("queued", 0) + jobs.get("failed", 0) + jobs.get("running", 0)
    dead_sends = sum(states.get("dead", 0) for states in report["outbound"].values())
    problems: list[dict[str, Any]] = []
    code = STATUS_OK
    if jobs.get("dead", 0) or dead_sends:
        code += STATUS_DEAD
        problems.append({"code": STATUS_DEAD, "problem":
                         f"{jobs.get('dead', 0)} dead jobs, {dead_sends} dead sends "
                         "(spine-node replay jobs|sends)"})
    if waiting and not any(w["live"] for w in workers):
        code += STATUS_NO_WORKER
        problems.append({"code": STATUS_NO_WORKER, "problem":
                         f"{waiting} jobs waiting and no live worker "
                         f"(no heartbeat within {live_age:g} s)"})
    ages = [a for a in (report["oldest_queued_age_s"], report["oldest_pending_send_age_s"])
            if a is not None]
    if ages and max(ages) > settings.status_max_queue_age_s:
        code += STATUS_STALE_QUEUE
        problems.append({"code": STATUS_STALE_QUEUE, "problem":
                         f"oldest queued item is {max(ages):.0f} s old "
                         f"(status_max_queue_age_s = {settings.status_max_queue_age_s:g})"})
    report["problems"] = problems
    report["exit_code"] = code
    return report


def delivery_report(per_study: dict[str, dict[str, str | None]]) -> dict[str, Any]:
    """Per delivery kind (``ris``, ``commitment``): studies counted by state, and the studies
    not done."""
    from spine_node.store import DELIVERY_FIELDS, DeliveryState

    out: dict[str, Any] = {}
    for kind in DELIVERY_FIELDS:
        counts = {state.value: 0 for state in DeliveryState}
        open_studies = []
        for uid, states in sorted(per_study.items()):
            state = states.get(kind)
            if state is None:
                continue
            counts[state] += 1
            if state != DeliveryState.DONE.value:
                open_studies.append({"study_instance_uid": uid, "state": state})
        out[kind] = {"studies": counts, "not_done": open_studies[:50]}
    return out
