"""The documentation says what the node does: the settings table in the README and the commented
``config/spine-node.toml`` show the settings model's defaults, the conformance statement's
series descriptions are the defaults, README's command table and ``--help`` list the same
commands, and the README's demo threshold is the demo bundle's."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from spine_node.cli import build_parser
from spine_node.config import CONFIG_PATH_ENV, Settings
from spine_node.models.bundle import load_manifest
from spine_node.node import demo_bundle_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIG = ROOT / "config" / "spine-node.toml"
#: Keys whose value in the shipped file is a site's choice; their comment states the default.
SITE_KEYS = {"allowed_calling_aes", "bundle", "database_url", "webhook_url"}


def defaults() -> dict[str, Any]:
    """Dotted setting name -> default, as JSON values."""
    flat: dict[str, Any] = {}
    for key, value in Settings().model_dump(mode="json").items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_lines() -> dict[str, tuple[Any, bool, str]]:
    """Dotted key -> (value, commented out, comment with its continuation lines)."""
    found: dict[str, tuple[Any, bool, str]] = {}
    section = ""
    last = ""
    for raw in CONFIG.read_text().splitlines():
        line = raw.strip()
        header = re.match(r"^\[\[?([a-z_.]+)\]\]?$", line)
        if header:
            section, last = header.group(1), ""
            continue
        match = re.match(r"^(#\s*)?([a-z_]+)\s*=\s*(.+)$", line)
        if not match:
            continued = re.match(r"^(\s+#|#\s{5,})", raw)  # an indented comment goes on
            if last and continued:
                value, commented, comment = found[last]
                found[last] = (value, commented, comment + " " + line.lstrip("# "))
            else:
                last = ""
            continue
        commented, key, rest = bool(match.group(1)), match.group(2), match.group(3)
        value = tomllib.loads(f"v = {rest}")["v"]
        comment = rest.split(" #", 1)[1] if " #" in rest else ""
        last = f"{section}.{key}" if section else key
        found[last] = (value, commented, comment)
    return found


def test_shipped_config_shows_every_setting_with_its_default() -> None:
    lines = config_lines()
    expected = defaults()
    for name, default in expected.items():
        if name == "destinations":
            assert "destinations.name" in lines  # an example [[destinations]] table
            continue
        assert name in lines, f"config/spine-node.toml does not mention {name}"
        value, commented, comment = lines[name]
        if name in SITE_KEYS:
            assert "default" in comment, f"{name}: the comment does not state the default"
        elif commented:
            assert default is None, f"{name} is commented out but defaults to {default!r}"
        else:
            assert value == default, f"{name}: file says {value!r}, default is {default!r}"


def readme_settings() -> dict[str, Any]:
    rows = re.findall(r"^\| `([a-z_.]+)` \| (none|`[^`]*`) \| .+ \|$", README, re.MULTILINE)
    return {key: None if cell == "none" else json.loads(cell.strip("`")) for key, cell in rows}


def test_readme_table_lists_every_setting_with_its_default() -> None:
    table = readme_settings()
    expected = defaults()
    assert set(table) == set(expected), set(table) ^ set(expected)
    for name, default in expected.items():
        assert table[name] == default, f"README says {name} = {table[name]!r}, default {default!r}"


def test_conformance_series_descriptions_are_the_defaults() -> None:
    text = (ROOT / "docs" / "conformance.md").read_text()
    results = Settings().results
    for number, description in (
        (results.sr_series_number, results.sr_series_description),
        (results.sc_series_number, results.sc_series_description),
        (results.gsps_series_number, results.gsps_series_description),
    ):
        assert re.search(rf"\| {number} \| {re.escape(description)} \|", text), (number, description)


def test_readme_commands_are_the_cli_commands() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    commands = set(sub.choices)  # type: ignore[attr-defined]
    documented = set(re.findall(r"^\| `spine-node ([a-z]+)", README, re.MULTILINE))
    assert documented == commands
    help_text = parser.format_help()
    assert CONFIG_PATH_ENV in help_text and "/etc/spine-node/spine-node.toml" in help_text
    assert "Console entry point" not in help_text  # a user's description, not a docstring


def test_readme_demo_threshold_is_the_bundles() -> None:
    threshold = float(load_manifest(demo_bundle_path()).threshold)
    stated = re.findall(r"fitted threshold ([0-9.]+)", README)
    assert stated and all(float(v) == round(threshold, 3) for v in stated), (stated, threshold)
    assert "0.478" not in README  # the method's default is not what any bundle runs
