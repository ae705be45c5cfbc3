"""Readiness checks name what is wrong: database, bundle, spool, outbox."""

from __future__ import annotations

from pathlib import Path

from spine_node.health import readiness
from spine_node.node import prepare_data_dir
from spine_node.store import JobStore, make_engine
from tests.nodekit import node_settings


def test_readiness_names_each_problem(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, bundle="demo")
    prepare_data_dir(settings)
    store = JobStore.open(settings.db_url)
    try:
        ok = readiness(settings, store, bundle_known=True)
        assert ok.ready and ok.to_json() == {
            "ready": True,
            "checks": {"database": "ok", "bundle": "ok", "spool": "ok", "outbox": "ok"},
        }
        settings.spool_dir.rmdir()
        settings.spool_dir.write_text("not a directory")  # root ignores permissions; this not
        broken = readiness(settings, store, bundle_known=False)
        assert not broken.ready and set(broken.problems) == {"bundle", "spool"}
        assert "spool directory" in broken.problems["spool"]
        assert "'demo' not configured or not verified" in broken.problems["bundle"]
    finally:
        store.close()
    gone = JobStore(make_engine(f"sqlite:///{tmp_path / 'missing' / 'q.db'}"))
    problem = readiness(settings, gone, bundle_known=True).problems["database"]
    assert problem.startswith("database not reachable: unable to open database file")
