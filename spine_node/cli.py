"""Console entry point ``spine-node``; the only place that configures logging."""

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
from typing import Any

from spine_node.config import ConfigError, Settings, load_settings
from spine_node.logs import JsonFormatter, configure_logging

__all__ = ["JsonFormatter", "build_parser", "configure_logging", "main"]

DEFAULT_CONFIG = Path("/etc/spine-node/spine-node.toml")


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config:
        return Path(args.config)
    env = os.environ.get("SPINE_NODE_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the node: every role (default) or one."""
    from spine_node.node import ROLES, NoBundle, start_node

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    roles = ROLES if args.role == "all" else (args.role,)
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
    try:
        node = start_node(settings, roles)
    except NoBundle as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print queue counts (JSON or a table)."""
    from spine_node.node import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        report = store.status()
        report["dead"] = store.dead_letters()
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    print(f"instances received   {report['instances']}")
    categories = report.get("categories", {})
    print(f"  ignored: not an image {categories.get('not_image', 0)}")
    print(f"  out of scope          {categories.get('out_of_scope', 0)}")
    age = report["oldest_queued_age_s"]
    print(f"oldest queued age    {'-' if age is None else f'{age:.1f} s'}")
    print("jobs")
    for state, n in report["jobs"].items():
        print(f"  {state:<18} {n}")
    print("outbound")
    if not report["outbound"]:
        print("  (none)")
    for dest, states in report["outbound"].items():
        print(f"  {dest}: " + ", ".join(f"{s} {n}" for s, n in states.items()))
    for item in report["dead"]["jobs"]:
        print(f"  dead job {item['job_id']}: {item['error']}")
    for item in report["dead"]["sends"]:
        print(f"  dead send {item['send_id']} to {item['destination']}: {item['error']}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured destination."""
    from spine_node.dispatcher import echo

    settings = _settings(args)
    try:
        dest = settings.destination(args.name)
    except KeyError as exc:
        print(f"spine-node: {exc.args[0]}", file=sys.stderr)
        return 2
    status = echo(dest, settings.ae_title, timeout_s=args.timeout)
    if status == 0:
        print(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO success")
        return 0
    what = "no association" if status is None else f"status 0x{status:04X}"
    print(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): C-ECHO failed: {what}")
    return 1


def cmd_replay(args: argparse.Namespace) -> int:
    """Requeue dead sends or dead/failed jobs."""
    from spine_node.node import open_store

    settings = _settings(args)
    store = open_store(settings)
    try:
        n = store.replay(args.what, args.id or ())
    finally:
        store.close()
    print(f"requeued {n} {args.what}")
    return 0


def cmd_worklist(args: argparse.Namespace) -> int:
    """List studies by triage priority, then arrival."""
    from spine_node.node import open_store
    from spine_node.worklist import build_worklist

    settings = _settings(args)
    store = open_store(settings)
    try:
        rows = build_worklist(store.studies())
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'rank':>4}  {'priority':<14} {'max score':>9}  {'images':>6}  {'ignored':>7}  "
        f"{'arrived':<19}  study"
    )
    for row in rows:
        score = "-" if row["max_score"] is None else f"{row['max_score']:.3f}"
        arrived = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["arrival"]))
        ignored = row["n_not_image"] + row["n_out_of_scope"]
        print(
            f"{row['rank']:>4}  {row['priority']:<14} {score:>9}  {row['n_images']:>6}  "
            f"{ignored:>7}  {arrived:<19}  {row['study_instance_uid']}"
        )
    if any(row["n_not_image"] or row["n_out_of_scope"] for row in rows):
        print("ignored: objects that are not images, and images out of scope (not analysed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``spine-node`` argument parser."""
    parser = argparse.ArgumentParser(prog="spine-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", help=f"settings file (default: $SPINE_NODE_CONFIG or {DEFAULT_CONFIG})"
        )
        return p

    p = with_config(sub.add_parser("serve", help="run the node"))
    p.add_argument("--role", choices=["all", "receiver", "worker", "dispatcher"], default="all")
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("status", help="queue counts"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = with_config(sub.add_parser("echo", help="C-ECHO a configured destination"))
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo)

    p = with_config(sub.add_parser("replay", help="requeue dead sends or jobs"))
    p.add_argument("what", choices=["sends", "jobs"])
    p.add_argument("--id", type=int, action="append", help="only these ids (repeatable)")
    p.set_defaults(func=cmd_replay)

    p = with_config(sub.add_parser("worklist", help="studies ranked by triage priority"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_worklist)

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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
