"""The systemd units: hardening keys present, exposure score within the documented goal, and
``systemd-analyze verify`` clean against a throw-away root holding the units and a stub binary."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
DOC = ROOT / "docs" / "security.md"
ANALYZE = shutil.which("systemd-analyze")
# .ci/peers installs systemd when systemd-analyze is missing: never skipped
needs_analyze = pytest.mark.usefixtures()


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (systemd keys may repeat)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def documented_goal() -> float:
    match = re.search(r"exposure goal[^0-9]*([0-9]+\.[0-9])", DOC.read_text(), re.IGNORECASE)
    assert match, "docs/security.md states no exposure goal"
    return float(match.group(1))


def test_every_role_has_a_unit() -> None:
    names = {u.name for u in UNITS}
    assert {
        "spine-node-receiver.service",
        "spine-node-worker.service",
        "spine-node-dispatcher.service",
        "spine-node-worker@.service",
    } <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_has_the_required_hardening(unit: Path) -> None:
    keys = parse_unit(unit)

    def one(key: str) -> str:
        values = keys.get(f"Service.{key}")
        assert values, f"{unit.name}: {key}= missing"
        return values[-1]

    assert one("User") == "spine-node" and one("Group") == "spine-node"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "RestrictNamespaces",
        "LockPersonality",
        "RemoveIPC",
        "PrivateMounts",
    ):
        assert one(key) == "yes", f"{unit.name}: {key}"
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") == ""
    assert keys["Service.ReadWritePaths"] == ["/var/lib/spine-node"]
    assert one("UMask") == "0077"
    filters = keys["Service.SystemCallFilter"]
    assert "@system-service" in filters and any(f.startswith("~@privileged") for f in filters)
    assert one("IPAddressDeny") == "any"
    assert "0.0.0.0/0" not in one("IPAddressAllow") and "::/0" not in one("IPAddressAllow")
    if "worker" in unit.name:
        # PyTorch (oneDNN, CUDA) writes code at run time: W^X would break it
        assert keys.get("Service.MemoryDenyWriteExecute", ["no"])[-1] != "yes"
        assert one("DevicePolicy") == "closed"
    else:
        assert one("MemoryDenyWriteExecute") == "yes"
        assert one("PrivateDevices") == "yes" and one("PrivateUsers") == "yes"


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_exposure_score_within_the_documented_goal(unit: Path) -> None:
    out = subprocess.run(
        [str(ANALYZE), "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    score = float(match.group(1))
    print(f"{unit.name}: {score}")
    assert score <= documented_goal()
    assert unit.name in DOC.read_text()  # the score is recorded there


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "root"
    units_dir = root / "etc" / "systemd" / "system"
    units_dir.mkdir(parents=True)
    for unit in (ROOT / "systemd").iterdir():
        shutil.copy(unit, units_dir / unit.name)
    system = Path("/usr/lib/systemd/system")
    assert (system / "sysinit.target").exists(), "systemd's unit library is not installed"
    shutil.copytree(system, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    binary = root / "opt" / "spine-node" / ".venv" / "bin" / "spine-node"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    names = [u.name for u in UNITS if not u.name.endswith("@.service")]
    names += ["spine-node-worker@0.service", "spine-node.target"]
    out = subprocess.run(
        [str(ANALYZE), "verify", f"--root={root}", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # verify exits 0 on unknown keys or bad values too: any message is a finding
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", (
        out.stdout + out.stderr
    )
