"""spine-node: an on-premises DICOM node that triages spine radiographs and sends the results
(SR, overlay, GSPS) back to the PACS.

Every command except analyze and demo reads its settings from --config FILE, else from
the file named by $SPINE_NODE_CONFIG, else from /etc/spine-node/spine-node.toml; without any of
them it exits with status 2 (it never runs on built-in defaults). Exit status 2 also means a bad
setting or a role that cannot start (bundle, data directory, database, TLS file), with one line
on stderr naming the path or key and the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spine_node.config import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    DicomDestination,
    Hl7Destination,
    Settings,
    WebhookDestination,
    config_path,
    load_settings,
)
from spine_node.logs import JsonFormatter, configure_logging
from spine_node.sdnotify import Notifier
from spine_node.status import (
    STATUS_DEAD,
    STATUS_NO_WORKER,
    STATUS_OK,
    STATUS_STALE_QUEUE,
    delivery_report,
)
from spine_node.status import status_report as _status_report

if TYPE_CHECKING:
    from spine_node.store import JobStore

__all__ = [
    "STATUS_DEAD",
    "STATUS_NO_WORKER",
    "STATUS_OK",
    "STATUS_STALE_QUEUE",
    "JsonFormatter",
    "build_parser",
    "configure_logging",
    "delivery_report",
    "main",
    "status_report",
]


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(getattr(args, "config", None)))


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node: every role (default) or one."""
    from spine_node.node import serve_roles, start_node

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json, settings.log_phi)
    roles = serve_roles(settings) if args.role == "all" else (args.role,)
    if "receiver" in roles:
        from spine_node.transport import IncompatiblePynetdicom, check_pynetdicom

        try:
            check_pynetdicom()  # before any role starts
        except IncompatiblePynetdicom as exc:
            print(f"spine-node: {exc}", file=sys.stderr)
            return 2
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("signal %d: finishing current work, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    notifier = Notifier.from_environment()
    node = start_node(settings, roles)  # StartupError: one line, exit 2 (main)
    # every role is ready now: the receiver's port is bound, the worker's models are loaded
    notifier.ready(ready_status(settings, roles, node))
    pause = min(1.0, notifier.watchdog_interval_s or 1.0)
    dead_logged = False
    try:
        while not stop.wait(pause):
            problem = node.problem()
            if problem is None:
                notifier.watchdog()
            elif not dead_logged:  # no more pings: systemd's watchdog restarts the service
                logging.getLogger(__name__).error("%s; watchdog not pinged", problem)
                notifier.status(problem)
                dead_logged = True
    finally:
        notifier.stopping()
        node.stop()
    return 0


def ready_status(settings: Settings, roles: Sequence[str], node: Any) -> str:
    """The STATUS= line sent with READY=1: what each started role does."""
    parts = []
    if "receiver" in roles:
        parts.append(f"receiver {settings.ae_title} on {settings.bind_address}:{settings.port}")
    if "worker" in roles:
        info = getattr(node.cascade, "model_info", None)
        model = "" if info is None else f" ({info.name} {info.version})"
        parts.append(f"worker{model}")
    if "dispatcher" in roles:
        parts.append(f"dispatcher ({len(settings.destinations)} destinations)")
    if "web" in roles and getattr(node, "web", None) is not None:
        parts.append(f"web on {settings.web.bind_address}:{node.web.port}")
    return "ready: " + "; ".join(parts)


def status_report(settings: Settings, store: JobStore | None = None) -> dict[str, Any]:
    """Everything ``spine-node status`` shows (:func:`spine_node.status.status_report`), read
    from ``store`` when given, else from the configured database (opened and closed here)."""
    from spine_node.node import open_store

    if store is not None:
        return _status_report(settings, store)
    store = open_store(settings)
    try:
        return _status_report(settings, store)
    finally:
        store.close()


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s ago"


def cmd_status(args: argparse.Namespace) -> int:
    """Print queue counts, workers and problems (JSON or a table); exit code as documented."""
    settings = _settings(args)
    report = status_report(settings)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return int(report["exit_code"])
    print(f"instances received   {report['instances']}")
    categories = report.get("categories", {})
    print(f"  ignored: not an image {categories.get('not_image', 0)}")
    print(f"  out of scope          {categories.get('out_of_scope', 0)}")
    age = report["oldest_queued_age_s"]
    print(f"oldest queued age    {'-' if age is None else f'{age:.1f} s'}")
    send_age = report["oldest_pending_send_age_s"]
    print(f"oldest unsent age    {'-' if send_age is None else f'{send_age:.1f} s'}")
    print("jobs")
    for state, n in report["jobs"].items():
        print(f"  {state:<18} {n}")
    print("outbound")
    if not report["outbound"]:
        print("  (none)")
    for dest, states in report["outbound"].items():
        print(f"  {dest}: " + ", ".join(f"{s} {n}" for s, n in states.items()))
    for kind, entry in report["delivery"].items():
        counts = entry["studies"]
        if any(counts.values()):
            print(f"delivery {kind} per study: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
            for item in entry["not_done"]:
                print(f"  {item['state']:<8} {item['study_instance_uid']}")
    print("workers")
    if not report["workers"]:
        print("  (none)")
    now = time.time()
    for w in report["workers"]:
        bundle = w["bundle"]
        last_job = (
            "no job yet" if w["last_job_id"] is None
            else f"last job {w['last_job_id']} {_ago(now - w['last_job_at'])}"
        )
        print(f"  {w['owner']:<24} {'live' if w['live'] else 'NOT SEEN':<8} "
              f"seen {_ago(w['last_seen_age_s'])}, bundle {bundle['name']} {bundle['version']} "
              f"({bundle['sha256'][:12]}), {last_job}")
    for item in report["dead"]["jobs"]:
        print(f"  dead job {item['job_id']}: {item['error']}")
    for item in report["dead"]["sends"]:
        print(f"  dead send {item['send_id']} to {item['destination']}: {item['error']}")
    for problem in report["problems"]:
        print(f"PROBLEM ({problem['code']}): {problem['problem']}")
    if not report["problems"]:
        print("OK")
    return int(report["exit_code"])


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured destination."""
    from spine_node.dispatcher import echo

    settings = _settings(args)
    try:
        dest = settings.destination(args.name)
    except KeyError as exc:
        print(f"spine-node: {exc.args[0]}", file=sys.stderr)
        return 2
    if not isinstance(dest, DicomDestination):
        return _echo_tcp(dest, args.timeout)
    from spine_node.reach import check_connect
    from spine_node.tls import client_ssl_context, settings_problem

    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
    if dest.tls.enabled:  # the check `serve` makes at start, same message
        problem = settings_problem(dest.tls, f"destinations.{dest.name}.tls", client_ssl_context)
        if problem is not None:
            print(f"spine-node: {problem}", file=sys.stderr)
            return 2
    unreachable = check_connect(dest.host, dest.port, args.timeout)
    if unreachable is not None:
        print(f"{where}: C-ECHO failed: not reachable: {unreachable}")
        return 1
    notes: list[str] = []
    try:
        status = echo(dest, settings.ae_title, timeout_s=args.timeout, notes=notes)
    except OSError as exc:
        print(f"{where}: C-ECHO failed: {exc.strerror or exc}")
        return 1
    if status == 0:
        print(f"{where}: C-ECHO success")
        return 0
    what = f"status 0x{status:04X}" if status is not None else "no association"
    why = f": {notes[0]}" if notes else ""
    print(f"{where}: C-ECHO failed: {what}{why}")
    return 1


def _echo_tcp(dest: Hl7Destination | WebhookDestination, timeout_s: float) -> int:
    """The reachability check of an HL7 or webhook destination (they have no C-ECHO)."""
    from spine_node.reach import check_connect, url_endpoint

    if isinstance(dest, Hl7Destination):
        host, port, tls = dest.host, dest.port, False
        what = "MLLP TCP connection accepted (HL7 v2 has no echo message; results are " \
            "confirmed by their ACKs)"
    else:
        host, port, tls = url_endpoint(dest.url)
        what = ("TLS connection verified" if tls else "TCP connection accepted") + \
            " (no request sent; results are confirmed by the receiver's 2xx answer)"
    problem = check_connect(host, port, timeout_s, tls=tls)
    if problem is None:
        print(f"{dest.name} ({dest.kind} {host}:{port}): {what}")
        return 0
    print(f"{dest.name} ({dest.kind} {host}:{port}): not reachable: {problem}")
    return 1


def cmd_replay(args: argparse.Namespace) -> int:
    """Requeue dead sends or dead/failed jobs; exit 1 when a given id is unknown or not dead."""
    from spine_node.node import open_store
    from spine_node.store import Monitor

    settings = _settings(args)
    ids = tuple(args.id or ())
    replayable = ("dead",) if args.what == "sends" else ("dead", "failed")
    store = open_store(settings)
    try:
        states = Monitor(store).states_of(args.what, ids) if ids else {}
        n = store.replay(args.what, ids) if not ids or states else 0
    finally:
        store.close()
    status = 0
    noun = args.what[:-1]
    for i in ids:
        if i not in states:
            print(f"spine-node replay: no {noun} with id {i}", file=sys.stderr)
            status = 1
        elif states[i] not in replayable:
            print(f"spine-node replay: {noun} {i} is {states[i]}, not "
                  f"{' or '.join(replayable)}; not requeued", file=sys.stderr)
            status = 1
    print(f"requeued {n} {args.what}")
    return status


def parse_time(text: str) -> float:
    """ISO 8601 date or date-time (local time when it has no offset) -> epoch seconds.

    Raises
    ------
    ConfigError
        When ``text`` is not an ISO 8601 date or date-time.
    """
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError("--since", text, "not an ISO 8601 date or date-time") from None
    return moment.astimezone().timestamp()


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Queue finished images again; exit 1 when none matched."""
    from spine_node.node import open_store
    from spine_node.store import Monitor

    settings = _settings(args)
    since = None if args.since is None else parse_time(args.since)
    store = open_store(settings)
    try:
        requeued, skipped = Monitor(store).requeue_finished(
            study_instance_uid=args.study, sop_instance_uid=args.instance, received_since=since
        )
    finally:
        store.close()
    selector = (f"study {args.study}" if args.study else f"instance {args.instance}"
                if args.instance else f"images received since {args.since}")
    logging.getLogger(__name__).info(
        "reprocess %s: %d images queued again, %d skipped", selector, len(requeued), len(skipped)
    )
    print(f"queued {len(requeued)} finished images again ({selector}); the worker analyses "
          "them with the configured bundle and sends the new result objects")
    for uid in skipped:
        print(f"  skipped {uid}: the received image was removed by spool retention")
    if not requeued and not skipped:
        print(f"spine-node reprocess: no finished image matches {selector}", file=sys.stderr)
    return 0 if requeued else 1


def cmd_worklist(args: argparse.Namespace) -> int:
    """List studies by triage priority, then arrival."""
    from spine_node.node import open_store
    from spine_node.worklist import build_worklist

    settings = _settings(args)
    store = open_store(settings)
    try:
        rows = build_worklist(
            store.studies(settings.commitment_destinations, ignored_studies=True)
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'rank':>4}  {'priority':<14} {'max score':>9}  {'images':>6}  {'ignored':>7}  "
        f"{'arrived':<19}  {'RIS':<7}  {'commit':<7}  study"
    )
    for row in rows:
        score = "-" if row["max_score"] is None else f"{row['max_score']:.3f}"
        arrived = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["arrival"]))
        ignored = row["n_not_image"] + row["n_out_of_scope"]
        print(
            f"{row['rank']:>4}  {row['priority']:<14} {score:>9}  {row['n_images']:>6}  "
            f"{ignored:>7}  {arrived:<19}  {row['delivery']['ris'] or '-':<7}  "
            f"{row['delivery']['commitment'] or '-':<7}  "
            f"{row['study_instance_uid']}"
            + (f"  ({row['reason']})" if row["reason"] else "")
        )
    if any(row["n_not_image"] or row["n_out_of_scope"] for row in rows):
        print("ignored: objects that are not images, and images out of scope (not analysed); "
              "a study with priority 'ignored' has no analysed image, the reason in brackets")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    """Record, list or export radiologist feedback; exit 1 for an unknown image."""
    from spine_node.feedback import (
        FeedbackEntry,
        FeedbackSource,
        Verdict,
        parse_label,
        write_csv,
    )
    from spine_node.node import open_store
    from spine_node.store import FeedbackLog, UnknownImage

    settings = _settings(args)
    store = open_store(settings)
    try:
        log = FeedbackLog(store)
        if args.action == "record":
            try:
                entry = FeedbackEntry(
                    sop_instance_uid=args.sop_instance_uid,
                    study_instance_uid="?",  # the received image's study is stored
                    verdict=Verdict(args.verdict),
                    corrected_label=parse_label(args.label),
                    lesion=args.lesion,
                    reader=args.reader or "",
                    comment=args.comment or "",
                    source=FeedbackSource.CLI,
                )
            except ValueError as exc:
                raise ConfigError("feedback", args.sop_instance_uid, str(exc)) from None
            try:
                stored = log.record(entry)
            except UnknownImage as exc:
                print(f"spine-node feedback: {exc.args[0]}", file=sys.stderr)
                return 1
            print(f"recorded feedback {stored.feedback_id}: {stored.verdict.value} on "
                  f"{stored.sop_instance_uid} (AI: {stored.model_status or 'no result'})")
            return 0
        entries = log.entries(study_instance_uid=getattr(args, "study", None))
    finally:
        store.close()
    if args.action == "export":
        n = write_csv(entries, args.csv)
        print(f"wrote {n} feedback rows to {args.csv}")
        return 0
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    for e in entries:
        label = "" if e.corrected_label is None else f" -> {e.corrected_label.value}"
        lesion = "" if e.lesion is None else f" ({e.lesion})"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.recorded_at))
        print(f"{e.feedback_id:>5}  {when}  {e.verdict.value:<8}{label}{lesion}  "
              f"AI {e.model_status or '-'}  {e.reader or '-'}  {e.sop_instance_uid}")
    if not entries:
        print("no feedback recorded")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``spine-node`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="spine-node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            help=f"settings file (default: ${CONFIG_PATH_ENV}, else {DEFAULT_CONFIG_PATH}; "
            "none of them: exit 2)",
        )
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.add_argument("--role", choices=["all", "receiver", "worker", "dispatcher", "web"],
                   default="all",
                   help="all: receiver, worker, dispatcher and (when web.enabled) web")
    p.set_defaults(func=cmd_serve)

    p = with_config(
        sub.add_parser(
            "status",
            help="queue counts, live workers, dead letters; non-zero exit on problems",
            description="Exit codes (added up when several hold): 0 healthy; "
            f"{STATUS_DEAD} dead jobs or sends; {STATUS_NO_WORKER} jobs waiting and no live "
            f"worker; {STATUS_STALE_QUEUE} oldest queued job or unsent object older than "
            "status_max_queue_age_s; 2 bad configuration.",
        )
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = with_config(sub.add_parser(
        "echo",
        help="C-ECHO a configured DICOM destination; for an HL7 or webhook destination, "
        "check that it accepts a connection",
    ))
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo)

    p = with_config(sub.add_parser("replay", help="requeue dead sends or jobs"))
    p.add_argument("what", choices=["sends", "jobs"])
    p.add_argument("--id", type=int, action="append", help="only these ids (repeatable)")
    p.set_defaults(func=cmd_replay)

    p = with_config(
        sub.add_parser(
            "reprocess",
            help="analyse finished images again (e.g. after a bundle upgrade)",
            description="Queue finished images again; the worker analyses them with the "
            "configured bundle and sends the new result objects (a new bundle version gives "
            "new UIDs; the study summary SR is amended). "
            "Exit 1 when no finished image matches.",
        )
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="every image of this study")
    which.add_argument("--instance", metavar="UID", help="this image (SOP Instance UID)")
    which.add_argument("--since", metavar="TIME",
                       help="images received since TIME (ISO 8601, local time without offset)")
    p.set_defaults(func=cmd_reprocess)

    p = with_config(sub.add_parser("worklist", help="studies ranked by triage priority"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_worklist)

    p = sub.add_parser(
        "feedback",
        help="radiologist feedback on results: record, list, export as CSV",
        description="Agree or disagree with an image's AI result (optionally with the "
        "corrected label and lesion class); the CSV export is what training/feedback.py reads. "
        "Exit 1 when the image is unknown.",
    )
    actions = p.add_subparsers(dest="action", required=True)
    q = with_config(actions.add_parser("record", help="record one feedback"))
    q.add_argument("sop_instance_uid", help="the image's SOP Instance UID")
    q.add_argument("verdict", choices=["agree", "disagree"])
    q.add_argument("--label", choices=["normal", "abnormal"],
                   help="corrected label (with disagree)")
    from spine_node.labels import LESION_LABELS

    q.add_argument("--lesion", choices=LESION_LABELS, help="lesion class (with --label abnormal)")
    q.add_argument("--reader", help="who gives it (initials)")
    q.add_argument("--comment")
    q.set_defaults(func=cmd_feedback)
    q = with_config(actions.add_parser("list", help="feedback given, oldest first"))
    q.add_argument("--study", metavar="UID", help="only this study")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_feedback)
    q = with_config(actions.add_parser("export", help="every feedback as CSV"))
    q.add_argument("--csv", required=True, type=Path, metavar="FILE")
    q.set_defaults(func=cmd_feedback)

    try:
        from spine_node import analyze
    except ImportError:  # pragma: no cover - only while the cascade is being built
        analyze = None  # type: ignore[assignment]
    if analyze is not None:
        p = with_config(sub.add_parser("analyze", help="run the cascade on files offline"))
        analyze.add_arguments(p)
        p.set_defaults(func=analyze.run)

    from spine_node import export

    p = with_config(sub.add_parser("export", help="research export, de-identified by default"))
    export.add_arguments(p)
    p.set_defaults(func=lambda args: export.run(args, _settings(args)))

    try:
        from spine_node import demo
    except ImportError:  # pragma: no cover
        demo = None  # type: ignore[assignment]
    if demo is not None:
        p = sub.add_parser("demo", help="run the node end to end on phantom studies")
        demo.add_arguments(p)
        p.set_defaults(func=demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad configuration)."""
    from spine_node.node import StartupError

    args = build_parser().parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return status
    except (ConfigError, StartupError) as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``spine-node worklist | head``): stop quietly, as the
        # Python documentation's SIGPIPE note advises, so no traceback reaches the terminal
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
