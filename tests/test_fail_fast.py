"""Fail fast: a role that cannot work stops at start with exit 2 and one line naming the path
and the problem; nothing runs on silent built-in defaults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spine_node.config import CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH
from tests.nodekit import node_settings, write_config

pytest_plugins = ("tests.fixtures_models",)

CLI = [sys.executable, "-m", "spine_node.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env=_env() if env is None else env, check=False)


def _one_line(out: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_serve_without_any_config_file_exits_2() -> None:
    assert not DEFAULT_CONFIG_PATH.exists(), "this machine has a real node configuration"
    for role in ("all", "receiver", "worker", "dispatcher"):
        line = _one_line(_run("serve", "--role", role), str(DEFAULT_CONFIG_PATH))
        assert "--config" in line and CONFIG_PATH_ENV in line
    _one_line(_run("status"), str(DEFAULT_CONFIG_PATH))


def test_config_variable_is_not_a_setting_override(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.toml", node_settings(tmp_path))
    out = _run("status", "--json", env={**_env(), CONFIG_PATH_ENV: str(config)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["instances"] == 0
    missing = tmp_path / "nope.toml"
    _one_line(_run("status", env={**_env(), CONFIG_PATH_ENV: str(missing)}), str(missing),
              "file not found")


def _bad_bundles(tiny_bundle: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    missing = tmp_path / "no-such-bundle"
    bad_manifest = tmp_path / "bad-manifest"
    shutil.copytree(tiny_bundle, bad_manifest)
    (bad_manifest / "manifest.json").write_text("{ not json")
    altered = tmp_path / "altered"
    shutil.copytree(tiny_bundle, altered)
    manifest = json.loads((altered / "manifest.json").read_text())
    member = manifest["triage"]["members"][0]["weights"]
    with open(altered / member, "ab") as handle:
        handle.write(b"\0")
    return {
        "missing": (missing, "no such directory"),
        "bad manifest": (bad_manifest, "manifest.json is unreadable"),
        "hash mismatch": (altered, "sha256"),
    }


@pytest.mark.parametrize("problem", ["missing", "bad manifest", "hash mismatch"])
@pytest.mark.parametrize("role", ["worker", "all"])
def test_unloadable_bundle_stops_serve(tmp_path: Path, tiny_bundle: Path, problem: str,
                                       role: str) -> None:
    path, reason = _bad_bundles(tiny_bundle, tmp_path)[problem]
    config = write_config(tmp_path / "node.toml", node_settings(tmp_path, bundle=str(path)))
    _one_line(_run("serve", "--config", str(config), "--role", role), str(path), reason)
    # stopped before the queue was even created: no receiver acknowledged anything
    assert not (tmp_path / "data" / "spine-node.db").exists()


def test_unconfigured_bundle_stops_serve_all(tmp_path: Path) -> None:
    config = write_config(tmp_path / "node.toml", node_settings(tmp_path))
    _one_line(_run("serve", "--config", str(config)), "no model bundle is configured")


def test_unusable_data_dir_and_spool_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data_dir = blocker / "data"
    config = write_config(tmp_path / "node.toml",
                          node_settings(tmp_path, data_dir=str(data_dir)))
    for role in ("receiver", "dispatcher"):
        _one_line(_run("serve", "--config", str(config), "--role", role),
                  "data_dir", str(data_dir), "Not a directory")
    _one_line(_run("status", "--config", str(config)), str(data_dir))
    good = tmp_path / "data2"
    good.mkdir()
    (good / "spool").write_text("a file where the spool should be")
    config = write_config(tmp_path / "node2.toml", node_settings(tmp_path, data_dir=str(good)))
    _one_line(_run("serve", "--config", str(config), "--role", "receiver"),
              "spool", str(good / "spool"))


def test_unreadable_tls_files_exit_2(tmp_path: Path) -> None:
    cert = tmp_path / "missing-cert.pem"
    key_dir = tmp_path / "key-is-a-directory"
    key_dir.mkdir()
    settings = node_settings(
        tmp_path, tls={"enabled": True, "certificate": str(cert), "private_key": str(key_dir)}
    )
    config = write_config(tmp_path / "node.toml", settings)
    _one_line(_run("serve", "--config", str(config), "--role", "receiver"),
              "tls.certificate", str(cert))
    cert.write_text("not a certificate")
    _one_line(_run("serve", "--config", str(config), "--role", "receiver"),
              "tls.private_key", str(key_dir))
    dest = node_settings(
        tmp_path,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242,
                       "tls": {"enabled": True, "ca_file": str(tmp_path / "no-ca.pem")}}],
    )
    config = write_config(tmp_path / "dest.toml", dest)
    _one_line(_run("serve", "--config", str(config), "--role", "dispatcher"),
              "destinations.pacs.tls.ca_file", "no-ca.pem")


@pytest.mark.parametrize("role", ["receiver", "all"])
def test_port_in_use_stops_serve_with_one_line(tmp_path: Path, tiny_bundle: Path,
                                               role: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        settings = node_settings(tmp_path, port=port, bundle=str(tiny_bundle), device="cpu")
        config = write_config(tmp_path / "node.toml", settings)
        # exits (the whole process: no worker or scheduler left running) with one line
        out = _run("serve", "--config", str(config), "--role", role)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    problems = [line for line in out.stderr.splitlines() if line.startswith("spine-node:")]
    assert len(problems) == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in problems[0], problems[0]
