"""Settings: the documented minimal file, the shipped default, env overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spine_node.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = """\
ae_title = "SPINENODE"
port = 11112
data_dir = "/var/lib/spine-node"     # spool and SQLite database live under it by default
allowed_calling_aes = ["MODALITY1"]   # empty list: any calling AE
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
"""


def test_minimal_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL)
    s = load_settings(path, environ={})
    assert s.ae_title == "SPINENODE" and s.port == 11112
    assert s.allowed_calling_aes == ("MODALITY1",)
    assert s.destination("pacs").port == 4242
    assert s.db_url == "sqlite:////var/lib/spine-node/spine-node.db"
    assert s.spool_dir == Path("/var/lib/spine-node/spool")


def test_shipped_default_is_valid() -> None:
    s = load_settings(ROOT / "config" / "spine-node.toml", environ={})
    assert s.results.sr_series_number == 9901


def test_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL)
    env = {"SPINE_NODE_PORT": "2000", "SPINE_NODE_ALLOWED_CALLING_AES": '["A", "B"]',
           "SPINE_NODE_RESULTS__GSPS": "true", "SPINE_NODE_BUNDLE": "demo"}
    s = load_settings(path, environ=env)
    assert s.port == 2000 and s.allowed_calling_aes == ("A", "B")
    assert s.results.gsps is True and s.bundle == "demo"


@pytest.mark.parametrize(
    ("text", "env", "key", "value"),
    [
        (MINIMAL.replace("port = 11112", "port = 70000"), {}, "port", "70000"),
        (MINIMAL.replace('ae_title = "PACS"', 'ae_title = "A\\\\B"'), {}, "destinations.0.ae_title", "A\\B"),
        ("bogus = 1\n" + MINIMAL, {}, "bogus", "1"),
        (MINIMAL, {"SPINE_NODE_MAX_ASSOCIATIONS": "0"}, "max_associations", "0"),
        (MINIMAL, {"SPINE_NODE_NOPE": "1"}, "SPINE_NODE_NOPE", "1"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path: Path, text: str, env: dict[str, str], key: str,
                                       value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=env)
    assert info.value.key == key
    assert str(info.value.value) == value


def test_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL.replace("port = 4242", "port = -1"))
    out = subprocess.run([sys.executable, "-m", "spine_node.cli", "status", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "destinations.0.port" in lines[0] and "-1" in lines[0]
    path.write_text("port = = 3")
    out = subprocess.run([sys.executable, "-m", "spine_node.cli", "status", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not valid TOML" in out.stderr


def test_destinations_are_a_union_on_kind() -> None:
    from spine_node.config import DicomDestination, WebhookDestination, settings_from_mapping

    dicom = {"name": "webhook", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    hook = {"kind": "webhook", "name": "ris", "url": "https://ris.example/spine"}
    settings = settings_from_mapping({"destinations": [dicom, hook]}, environ={})
    assert [type(d) for d in settings.destinations] == [DicomDestination, WebhookDestination]
    assert settings.dicom_destinations == (settings.destinations[0],)
    assert settings.destination("ris").timeout_s == 30.0  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"destinations\.0.*'fax'"):
        settings_from_mapping({"destinations": [{"kind": "fax", "name": "x"}]}, environ={})
    with pytest.raises(ConfigError, match=r"destinations\.0\.url"):
        settings_from_mapping({"destinations": [{**hook, "url": "ftp://x"}]}, environ={})
    # the shorthand is one webhook destination named "webhook", read in one place
    short = settings_from_mapping({"webhook_url": "http://127.0.0.1:9/h"}, environ={})
    assert short.destinations == (
        WebhookDestination(kind="webhook", name="webhook", url="http://127.0.0.1:9/h"),
    )
    again = settings_from_mapping(short.model_dump(mode="json"), environ={})
    assert again.destinations == short.destinations  # dumped and loaded: not added twice


def test_storage_commitment_settings_of_a_dicom_destination() -> None:
    from spine_node.config import settings_from_mapping

    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    plain = settings_from_mapping({"destinations": [pacs]}, environ={})
    assert plain.commitment_destinations == {}
    asked = settings_from_mapping(
        {"destinations": [{**pacs, "storage_commitment": True, "commitment_retries": 1}]},
        environ={},
    )
    assert asked.commitment_destinations == {"pacs": 2}  # the first request and one retry
    for key, bad in (("commitment_timeout_s", 0), ("commitment_retries", -1),
                     ("commitment_report_wait_s", -1.0)):
        with pytest.raises(ConfigError) as info:
            settings_from_mapping({"destinations": [{**pacs, key: bad}]}, environ={})
        assert info.value.key == f"destinations.0.{key}" and info.value.value == bad


def test_hl7_destination() -> None:
    from spine_node.config import Hl7Destination, settings_from_mapping

    ris = {"kind": "hl7", "name": "ris", "host": "ris.example", "port": 2575}
    (dest,) = settings_from_mapping({"destinations": [ris]}, environ={}).destinations
    assert isinstance(dest, Hl7Destination)
    assert (dest.sending_application, dest.receiving_application, dest.processing_id,
            dest.message_profile, dest.timeout_s) == ("SPINENODE", "", "P", "", 30.0)
    assert settings_from_mapping({"destinations": [ris]}, environ={}).dicom_destinations == ()
    with pytest.raises(ConfigError, match=r"destinations\.0\.processing_id = 'X'"):
        settings_from_mapping({"destinations": [{**ris, "processing_id": "X"}]}, environ={})
    with pytest.raises(ConfigError, match=r"destinations\.0\.host"):
        settings_from_mapping({"destinations": [{"kind": "hl7", "name": "x", "port": 1}]},
                              environ={})
    with pytest.raises(ConfigError, match=r"destinations\.0\.timeout_s"):
        settings_from_mapping({"destinations": [{**ris, "timeout_s": 0}]}, environ={})
