"""Validated settings: a TOML file plus ``SPINE_NODE_<KEY>`` environment overrides.

Every number the node runs on is a setting with a default here; nothing is read from module
state. ``load_settings`` raises :class:`ConfigError`, naming the key and the bad value, which
the command line turns into one line on stderr and exit status 2.

``SPINE_NODE_CONFIG`` is not a setting: it names the settings file (``CONFIG_PATH_ENV``) and is
the one ``SPINE_NODE_*`` variable the override loader skips.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "SPINE_NODE_"
#: Environment variable naming the settings file; never read as a setting override.
CONFIG_PATH_ENV = "SPINE_NODE_CONFIG"
#: Where the installed node looks for its settings when neither --config nor the variable is given.
DEFAULT_CONFIG_PATH = Path("/etc/spine-node/spine-node.toml")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


class ConfigError(ValueError):
    """A configuration file or value is invalid.

    Parameters
    ----------
    key : str
        Dotted name of the offending setting (``"port"``, ``"destinations.0.host"``).
    value : Any
        The value that was received.
    message : str
        What is wrong with it.
    """

    def __init__(self, key: str, value: Any, message: str) -> None:
        self.key = key
        self.value = value
        self.message = message
        super().__init__(f"invalid setting {key} = {value!r}: {message}")


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not _AE_RE.match(stripped):
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return stripped


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Strict):
    """DICOM TLS (PS3.15 BCP 195) for the receiver or one destination."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_file: Path | None = None
    require_client_certificate: bool = False


class DicomDestination(_Strict):
    """A DICOM peer that receives our result objects by C-STORE (``kind = "dicom"``)."""

    kind: Literal["dicom"] = "dicom"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSSettings = TLSSettings()
    #: Ask the peer to commit to keeping the objects (Storage Commitment Push Model, N-ACTION)
    #: and count them delivered only when its N-EVENT-REPORT confirms them.
    storage_commitment: bool = False
    #: How long a commitment request waits for its report before it is asked again.
    commitment_timeout_s: float = Field(default=300.0, gt=0)
    #: Requests after the first (a timeout, or a failed object re-sent) before dead.
    commitment_retries: int = Field(default=3, ge=0, le=100)
    #: How long the association stays open after N-ACTION for a report on it (0: release).
    commitment_report_wait_s: float = Field(default=5.0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _check_ae(value)

    @property
    def commitment_max_requests(self) -> int:
        """Commitment requests per object before it is dead (``1 + commitment_retries``)."""
        return 1 + self.commitment_retries


class WebhookDestination(_Strict):
    """An HTTP endpoint that receives each study's state as a JSON POST (``kind = "webhook"``)."""

    kind: Literal["webhook"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://\S+$")
    timeout_s: float = Field(default=30.0, gt=0)


class Hl7Destination(_Strict):
    """A RIS that receives one HL7 v2.5.1 ORU^R01 per study revision over MLLP (``kind = "hl7"``).

    The application and facility names fill MSH-3 to MSH-6 (escaped per HL7, so any text
    is safe); ``processing_id`` is MSH-11 (P production, T training, D debugging) and
    ``message_profile``, when given, MSH-21 (the profile identifier the RIS expects).
    ``charset`` is MSH-18 and the encoding of the bytes (HL7 table 0211): ``"UNICODE UTF-8"``
    sends names in any script as UTF-8; ``"ASCII"`` leaves MSH-18 empty and transliterates
    (``Müller`` -> ``Muller``; characters with no ASCII letter become ``?``).
    """

    kind: Literal["hl7"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = Field(default="SPINENODE", max_length=227)
    sending_facility: str = Field(default="", max_length=227)
    receiving_application: str = Field(default="", max_length=227)
    receiving_facility: str = Field(default="", max_length=227)
    processing_id: Literal["P", "T", "D"] = "P"
    message_profile: str = Field(default="", max_length=427)
    charset: Literal["UNICODE UTF-8", "ASCII"] = "UNICODE UTF-8"
    timeout_s: float = Field(default=30.0, gt=0)


def _destination_kind(value: Any) -> str:
    """The tag of a destination: its ``kind`` (``"dicom"`` when not given)."""
    if isinstance(value, Mapping):
        return str(value.get("kind", "dicom"))
    return str(getattr(value, "kind", "dicom"))


def _field(value: Any, name: str) -> Any:
    """A destination's field, from a mapping (parsed TOML) or a model."""
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


#: A configured destination; the dispatcher picks its sender by ``kind``, never by its name.
#: Another kind is one more model with its own ``kind`` literal here.
Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")]
    | Annotated[WebhookDestination, Tag("webhook")]
    | Annotated[Hl7Destination, Tag("hl7")],
    Discriminator(_destination_kind),
]
_DESTINATION_TAGS = ("dicom", "webhook", "hl7")
#: Name of the webhook destination that the ``webhook_url`` shorthand stands for.
WEBHOOK_SHORTHAND_NAME = "webhook"


class ResultsSettings(_Strict):
    """What result objects are produced and how their series look."""

    sr_series_number: int = Field(default=9901, ge=1, le=2**31 - 1)
    sc_series_number: int = Field(default=9902, ge=1, le=2**31 - 1)
    gsps_series_number: int = Field(default=9903, ge=1, le=2**31 - 1)
    study_sr_series_number: int = Field(default=9900, ge=1, le=2**31 - 1)
    sr_series_description: str = "AI spine triage report"
    sc_series_description: str = "AI spine triage overlay"
    gsps_series_description: str = "AI spine triage annotations"
    study_sr_series_description: str = "AI spine triage study summary"
    heatmap_series_number: int = Field(default=9904, ge=1, le=2**31 - 1)
    heatmap_series_description: str = "AI spine triage heatmap"
    secondary_capture: bool = True
    gsps: bool = False
    heatmap: bool = False
    heatmap_method: Literal["gradcam", "layercam"] = "gradcam"
    institution_name: str = ""


class MonitoringSettings(_Strict):
    """Monitoring of the model in use: score drift against the bundle's validation scores."""

    window_days: float = Field(default=7.0, gt=0, le=366)
    drift_threshold: float = Field(default=0.25, gt=0)
    min_window_images: int = Field(default=50, ge=1)
    check_interval_s: float = Field(default=3600.0, gt=0)
    history_days: int = Field(default=30, ge=1, le=366)


class WebSettings(_Strict):
    """The web status page (``[web]``): where it listens and who may change state through it.

    ``token_file`` names a file holding the access token (one line; whitespace stripped). With
    a token, every page needs it (a login form sets a session cookie; API clients send
    ``Authorization: Bearer TOKEN``) and feedback and replay are enabled; without one, pages
    are read-only and only a loopback ``bind_address`` is allowed (docs/security.md).

    ``certificate`` and ``private_key`` serve the page over HTTPS; with
    ``require_client_certificate`` only clients presenting a certificate signed by ``ca_file``
    connect at all (which also allows a non-loopback address without a token, read-only).
    """

    enabled: bool = True
    port: int = Field(default=8480, ge=1, le=65535)
    bind_address: str = "127.0.0.1"
    token_file: Path | None = None
    session_max_age_s: float = Field(default=43200.0, gt=0)
    show_patient_names: bool = False
    recent_studies: int = Field(default=50, ge=1, le=1000)
    certificate: Path | None = None
    private_key: Path | None = None
    ca_file: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _https_needs_both_files(self) -> WebSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("web.certificate and web.private_key go together (HTTPS)")
        if self.require_client_certificate and (self.ca_file is None or self.certificate is None):
            raise ValueError("web.require_client_certificate needs HTTPS (web.certificate, "
                             "web.private_key) and web.ca_file")
        return self


class Settings(_Strict):
    """All settings of one node. See ``config/spine-node.toml`` for each key's meaning."""

    ae_title: str = "SPINENODE"
    port: int = Field(default=11112, ge=1, le=65535)
    bind_address: str = "0.0.0.0"
    data_dir: Path = Path("/var/lib/spine-node")
    database_url: str | None = None
    db_busy_timeout_s: float = Field(default=30.0, ge=0)
    allowed_calling_aes: tuple[str, ...] = ()
    require_called_ae: bool = True
    max_associations: int = Field(default=10, ge=1, le=1000)
    max_pdu_length: int = Field(default=65536, ge=4096, le=2**24)
    network_timeout_s: float = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    min_free_bytes: int = Field(default=1024**3, ge=0)
    tls: TLSSettings = TLSSettings()
    accept_unknown_sop_classes: bool = True
    intended_modalities: tuple[str, ...] = ("CR", "DX")
    report_out_of_scope: bool = False

    bundle: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "torch", "onnxruntime", "openvino", "onnx"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    worker_batch_size: int = Field(default=4, ge=1, le=256)
    decode_isolation: bool = True
    decode_timeout_s: float = Field(default=120.0, gt=0)
    worker_poll_s: float = Field(default=1.0, gt=0)
    lease_s: float = Field(default=600.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1, le=100)
    job_retry_delay_s: float = Field(default=10.0, ge=0)
    heartbeat_s: float = Field(default=10.0, gt=0)
    heartbeat_retention_h: float = Field(default=24.0, gt=0)

    send_max_attempts: int = Field(default=10, ge=1, le=1000)
    send_backoff_base_s: float = Field(default=10.0, gt=0)
    send_backoff_max_s: float = Field(default=3600.0, gt=0)
    send_backoff_jitter: float = Field(default=0.2, ge=0, le=1)
    send_batch_size: int = Field(default=50, ge=1, le=10000)
    sweep_interval_s: float = Field(default=0.5, gt=0)
    spool_retention_h: float = Field(default=168.0, ge=0)
    outbox_retention_h: float = Field(default=720.0, ge=0)
    status_max_queue_age_s: float = Field(default=900.0, gt=0)
    webhook_url: str | None = None

    log_json: bool = False
    log_phi: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    results: ResultsSettings = ResultsSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    web: WebSettings = WebSettings()
    destinations: tuple[Destination, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _webhook_shorthand(cls, data: Any) -> Any:
        """``webhook_url = URL`` is shorthand for a ``kind = "webhook"`` destination named
        ``"webhook"`` (the one place it is read)."""
        if not (isinstance(data, Mapping) and data.get("webhook_url")):
            return data
        data = dict(data)
        destinations = tuple(data.get("destinations", ()))
        shorthand = {"kind": "webhook", "name": WEBHOOK_SHORTHAND_NAME, "url": data["webhook_url"]}
        already = any(  # settings dumped and loaded again carry the expanded destination
            _destination_kind(d) == "webhook" and _field(d, "name") == WEBHOOK_SHORTHAND_NAME
            and _field(d, "url") == data["webhook_url"]
            for d in destinations
        )
        if not already:
            data["destinations"] = (*destinations, shorthand)
        return data

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _check_ae(value)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_calling(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae(v) for v in value)

    @field_validator("intended_modalities")
    @classmethod
    def _check_modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(v.strip().upper() for v in value)
        for v in out:
            if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", v):
                raise ValueError(f"a modality is 1 to 16 upper-case letters or digits, got {v!r}")
        return out

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destination name {name!r} is used twice")
        return value

    @property
    def spool_dir(self) -> Path:
        """Where received images are kept until their results are delivered."""
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        """Where result objects wait to be sent."""
        return self.data_dir / "outbox"

    @property
    def audit_path(self) -> Path:
        """The append-only audit file of objects received and sent (JSON lines)."""
        return self.data_dir / "audit.jsonl"

    @property
    def db_url(self) -> str:
        """SQLAlchemy URL of the queue database (SQLite under data_dir by default)."""
        return self.database_url or f"sqlite:///{self.data_dir / 'spine-node.db'}"

    @property
    def dicom_destinations(self) -> tuple[DicomDestination, ...]:
        """The destinations of kind ``"dicom"``."""
        return tuple(d for d in self.destinations if isinstance(d, DicomDestination))

    @property
    def commitment_destinations(self) -> dict[str, int]:
        """DICOM destinations with ``storage_commitment``: name -> requests per object."""
        return {
            d.name: d.commitment_max_requests
            for d in self.dicom_destinations
            if d.storage_commitment
        }

    def destination(self, name: str) -> Destination:
        """Return the destination called ``name``.

        Raises
        ------
        KeyError
            When no destination has that name.
        """
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise KeyError(f"no destination named {name!r} (configured: {known})")


def _env_value(raw: str) -> Any:
    """Parse an environment value: JSON when it parses (numbers, lists, booleans), else text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``SPINE_NODE_<KEY>`` (and ``SPINE_NODE_<SECTION>__<KEY>``) variables."""
    merged = dict(data)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Settings.model_fields:
            raise ConfigError(name, raw, "no such setting")
        target = merged
        for part in path[:-1]:
            inner = target.get(part)
            target[part] = dict(inner) if isinstance(inner, Mapping) else {}
            target = target[part]
        target[path[-1]] = _env_value(raw)
    return merged


def settings_from_mapping(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a mapping (the parsed TOML) with environment overrides applied.

    Parameters
    ----------
    data : Mapping
        Parsed configuration.
    environ : Mapping, optional
        Environment to read ``SPINE_NODE_*`` overrides from (default: ``os.environ``).

    Raises
    ------
    ConfigError
        Naming the first invalid key and its value.
    """
    merged = _apply_env(dict(data), os.environ if environ is None else environ)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        if len(loc) > 2 and loc[0] == "destinations" and loc[2] in _DESTINATION_TAGS:
            del loc[2]  # the union's tag (the destination's kind) is no part of the key
        key = ".".join(str(p) for p in loc) or "<file>"
        raise ConfigError(key, err.get("input"), err["msg"]) from None


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a TOML settings file (or only the environment when ``path`` is None).

    Raises
    ------
    ConfigError
        When the file is missing, is not valid TOML, or holds an invalid value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", str(path), "file not found") from None
        except OSError as exc:
            raise ConfigError("--config", str(path), f"cannot be read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
    return settings_from_mapping(data, environ)


def config_path(explicit: str | Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """Choose the settings file: ``--config``, else ``$SPINE_NODE_CONFIG``, else the default.

    There is no run on built-in defaults: when nothing is given and the default file does not
    exist, that is an error.

    Parameters
    ----------
    explicit : str or pathlib.Path or None
        The ``--config`` argument.
    environ : Mapping, optional
        Environment (default: ``os.environ``).

    Raises
    ------
    ConfigError
        When no file was named and :data:`DEFAULT_CONFIG_PATH` does not exist.
    """
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_PATH_ENV):
        return Path(env[CONFIG_PATH_ENV])
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    raise ConfigError(
        "--config",
        str(DEFAULT_CONFIG_PATH),
        f"no settings file: the default does not exist; pass --config FILE or set "
        f"{CONFIG_PATH_ENV} (the node never runs on built-in defaults)",
    )
