"""DICOM TLS (BCP 195) at the receiver and towards destinations, with DCMTK and pynetdicom peers.

Certificates come from the ``openssl`` command: a CA, a server certificate for 127.0.0.1, a
client certificate, and a rogue CA with its own client certificate.
"""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from spine_node.config import Settings, TLSSettings
from spine_node.dispatcher import Dispatcher, dispatch_settings, echo
from spine_node.node import RunningNode, open_store, prepare_data_dir, start_node
from spine_node.spool import relative_name, write_durable
from spine_node.store import DestinationKind, InstanceRecord, JobOutcome, SendSpec
from spine_node.tls import client_ssl_context, server_ssl_context
from tests.nodekit import free_port, make_image, node_settings, wait_for

VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = (
        d / f"{name}.key",
        d / f"{name}.csr",
        d / f"{name}.crt",
        d / f"{name}.ext",
    )
    extfile.write_text(ext)
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={name}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(extfile),
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    rogue = _ca(d, "rogue-ca")
    server = _leaf(
        d, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth\n")
    rogue_client = _leaf(d, "rogue", rogue, "extendedKeyUsage=clientAuth\n")
    return PKI(
        ca[0],
        server[0],
        server[1],
        client[0],
        client[1],
        rogue[0],
        rogue_client[0],
        rogue_client[1],
    )


@pytest.fixture
def tls_node(tmp_path: Path, pki: PKI) -> Iterator[tuple[Settings, RunningNode]]:
    settings = node_settings(
        tmp_path,
        network_timeout_s=30.0,
        tls={
            "enabled": True,
            "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key),
            "ca_file": str(pki.ca),
            "require_client_certificate": True,
        },
    )
    node = start_node(settings, ("receiver",))
    yield settings, node
    node.stop()


def _dcmtk(
    tool: str, port: int, key: Path | None, cert: Path | None, ca: Path, *files: Path
) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", str(key), str(cert)] if key and cert else ["+tla"]
    cmd = [
        tool,
        "-aet",
        "MODALITY1",
        "-aec",
        "SPINENODE",
        *tls,
        "-pw",
        "+cf",
        str(ca),
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _pynetdicom_echo(port: int, context: ssl.SSLContext) -> bool:
    ae = AE(ae_title="MODALITY1")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE", tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0


def test_dcmtk_with_trusted_client_certificate_echoes_and_stores(
    tls_node: tuple[Settings, RunningNode], pki: PKI, tmp_path: Path
) -> None:
    settings, node = tls_node
    out = _dcmtk("echoscu", settings.port, pki.client_key, pki.client_cert, pki.ca)
    assert out.returncode == 0, out.stdout + out.stderr
    src = tmp_path / "a.dcm"
    ds = make_image(src)
    out = _dcmtk("storescu", settings.port, pki.client_key, pki.client_cert, pki.ca, src)
    assert out.returncode == 0, out.stdout + out.stderr
    stored = dcmread(settings.spool_dir / relative_name(str(ds.SOPInstanceUID)))
    assert stored.PixelData == ds.PixelData
    assert node.store.status()["instances"] == 1


def test_untrusted_or_missing_client_certificate_is_refused(
    tls_node: tuple[Settings, RunningNode], pki: PKI, tmp_path: Path
) -> None:
    settings, node = tls_node
    src = tmp_path / "a.dcm"
    make_image(src)
    rogue = _dcmtk("storescu", settings.port, pki.rogue_key, pki.rogue_cert, pki.ca, src)
    assert rogue.returncode != 0
    anonymous = _dcmtk("echoscu", settings.port, None, None, pki.ca)
    assert anonymous.returncode != 0
    no_cert = client_ssl_context(TLSSettings(enabled=True, ca_file=pki.ca))
    assert not _pynetdicom_echo(settings.port, no_cert)
    trusted = client_ssl_context(
        TLSSettings(
            enabled=True, ca_file=pki.ca, certificate=pki.client_cert, private_key=pki.client_key
        )
    )
    assert _pynetdicom_echo(settings.port, trusted)  # the same peer with our client cert
    assert node.store.status()["instances"] == 0


def test_plain_tcp_to_the_tls_port_fails(tls_node: tuple[Settings, RunningNode]) -> None:
    settings, _ = tls_node
    out = subprocess.run(
        ["echoscu", "-aet", "MODALITY1", "-aec", "SPINENODE", "127.0.0.1", str(settings.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0


def _tls11_client(pki: PKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return str(tls.version())


def test_tls_1_1_is_refused(tls_node: tuple[Settings, RunningNode], pki: PKI) -> None:
    settings, _ = tls_node
    # Control: this client does speak TLS 1.1 to a server that allows it
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    legacy.minimum_version = ssl.TLSVersion.TLSv1_1
    legacy.set_ciphers("ALL:@SECLEVEL=0")
    legacy.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with legacy.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    assert _handshake(port, _tls11_client(pki)) == "TLSv1.1"
    thread.join(timeout=10)
    listener.close()
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _handshake(settings.port, _tls11_client(pki))
    modern = client_ssl_context(
        TLSSettings(
            enabled=True, ca_file=pki.ca, certificate=pki.client_cert, private_key=pki.client_key
        )
    )
    assert _handshake(settings.port, modern) in ("TLSv1.2", "TLSv1.3")


def test_silent_client_does_not_stall_other_handshakes(
    tls_node: tuple[Settings, RunningNode], pki: PKI
) -> None:
    settings, _ = tls_node
    with socket.create_connection(("127.0.0.1", settings.port), timeout=30):
        time.sleep(0.2)  # connected, never sends a ClientHello
        start = time.monotonic()
        out = _dcmtk("echoscu", settings.port, pki.client_key, pki.client_cert, pki.ca)
        elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout + out.stderr
    assert elapsed < settings.network_timeout_s / 3  # not queued behind the silent one


def test_context_validation(pki: PKI) -> None:
    with pytest.raises(TypeError, match="TLSSettings"):
        server_ssl_context({"enabled": True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="certificate"):
        server_ssl_context(TLSSettings(enabled=True))
    with pytest.raises(ValueError, match="ca_file"):
        server_ssl_context(
            TLSSettings(
                enabled=True,
                certificate=pki.server_cert,
                private_key=pki.server_key,
                require_client_certificate=True,
            )
        )
    with pytest.raises(ValueError, match="go together"):
        client_ssl_context(TLSSettings(enabled=True, certificate=pki.client_cert))
    ctx = server_ssl_context(
        TLSSettings(
            enabled=True,
            certificate=pki.server_cert,
            private_key=pki.server_key,
            ca_file=pki.ca,
            require_client_certificate=True,
        )
    )
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    ciphers = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert ciphers and all(
        ("GCM" in c or "CHACHA20" in c) and c.startswith(("ECDHE", "DHE")) for c in ciphers
    )
    # Only our CA is trusted for clients, not the system store
    assert len(ctx.get_ca_certs()) == 1


class _TLSStoreSCP:
    """DCMTK storescp with TLS, requiring our client certificate."""

    def __init__(self, out_dir: Path, pki: PKI) -> None:
        self.out_dir = out_dir
        self.port = free_port()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "storescp",
                "-aet",
                "PACS",
                "-od",
                str(out_dir),
                "+tls",
                str(pki.server_key),
                str(pki.server_cert),
                "-pw",
                "+cf",
                str(pki.ca),
                "-rc",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_dispatcher_delivers_to_a_tls_destination(tmp_path: Path, pki: PKI) -> None:
    pacs = _TLSStoreSCP(tmp_path / "pacs", pki)
    tls = {
        "enabled": True,
        "ca_file": str(pki.ca),
        "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key),
    }
    settings = node_settings(
        tmp_path,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "tls": tls,
            },
            {
                "name": "wrongca",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "tls": {**tls, "ca_file": str(pki.rogue_ca)},
            },
        ],
    )
    prepare_data_dir(settings)
    store = open_store(settings)
    try:
        wait_for(pacs.listening, timeout=15)
        assert echo(settings.destination("pacs"), "SPINENODE", 10.0) == 0
        assert echo(settings.destination("wrongca"), "SPINENODE", 10.0) is None
        ds = make_image(tmp_path / "r.dcm")
        uid = str(ds.SOPInstanceUID)
        write_durable(settings.outbox_dir, relative_name(uid), (tmp_path / "r.dcm").read_bytes())
        store.record_instance(
            InstanceRecord("src.1", "1.2", "1.3", "1.4", "1.2.840.10008.1.2.1", "M", "x/y.dcm", 1)
        )
        (job,) = store.claim_jobs("w", 60, 1, 3)
        store.complete_job(
            job.job_id,
            "w",
            JobOutcome("negative", 0.1, None, {}),
            [SendSpec("pacs", DestinationKind.DICOM, uid, relative_name(uid))],
        )
        dispatcher = Dispatcher(
            store,
            settings.destinations,
            settings.outbox_dir,
            dispatch_settings(settings),
            random.Random(0),
        )
        assert dispatcher.run_once() == 1
        assert store.status()["outbound"]["pacs"]["sent"] == 1
        received = [p for p in pacs.out_dir.iterdir() if p.is_file()]
        assert [str(dcmread(p).SOPInstanceUID) for p in received] == [uid]
    finally:
        pacs.stop()
        store.close()
