"""HTTPS against real loopback TLS servers (no Spark): a CA given through ``download.ca_bundle``, the certificate
failures that must be statuses (expired, wrong host name, self-signed), SNI, and keep-alive that never crosses hosts
nor skips the SSRF guard.

Certificates are made here with ``cryptography``: a test CA, and leaves for ``localhost`` / 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from image_server import quick_download_config

from laion_spark.download import status
from laion_spark.download.dns import Resolver
from laion_spark.download.fetch import Fetcher, FetchSettings
from laion_spark.testing.server import ImageServer, SyntheticImageHandler, serve_tls

IMAGE_PATH = "/img/red-circle-gray-0.jpg"


@dataclass
class Leaf:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Leaf:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Leaf(cert_path, key_path)


def _certificate(
    subject: str,
    names: list[x509.GeneralName],
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    valid_days: tuple[int, int] = (-1, 30),
    ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
        .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


LOOPBACK_NAMES = [
    x509.DNSName("localhost"),
    x509.DNSName("second.example"),
    x509.DNSName("rebound.example"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Leaf]:
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _certificate("laion_spark test CA", [], None, valid_days=(-1, 365), ca=True)
    issuer = (ca_cert.subject, ca_key)
    files = {"ca": _write(directory, "ca", ca_cert, ca_key)}
    files["valid"] = _write(directory, "valid", *_certificate("localhost", LOOPBACK_NAMES, issuer))
    files["expired"] = _write(
        directory, "expired", *_certificate("localhost", LOOPBACK_NAMES, issuer, valid_days=(-30, -1))
    )
    files["other_host"] = _write(
        directory, "other_host", *_certificate("images.example", [x509.DNSName("images.example")], issuer)
    )
    files["self_signed"] = _write(directory, "self_signed", *_certificate("localhost", LOOPBACK_NAMES, None))
    return files


@pytest.fixture
def tls_server(pki):
    started: list[ImageServer] = []

    def start(leaf: str) -> ImageServer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki[leaf].cert, pki[leaf].key)
        server = serve_tls(context)
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()


def _fetcher(pki, server: ImageServer, ca_bundle: str | None = None, resolver: Resolver | None = None, **changes):
    port = server.server_port
    allowed = changes.pop("allowed_hosts", [f"localhost:{port}", f"127.0.0.1:{port}"])
    config = quick_download_config(
        allowed_hosts=allowed, ca_bundle=str(pki["ca"].cert) if ca_bundle is None else ca_bundle, **changes
    )
    return Fetcher(FetchSettings.from_config(config), resolver=resolver)


def test_valid_certificate_from_the_configured_ca_bundle_and_sni(pki, tls_server) -> None:
    server = tls_server("valid")
    fetcher = _fetcher(pki, server)
    try:
        by_name = fetcher.fetch(f"https://localhost:{server.server_port}{IMAGE_PATH}")
        by_address = fetcher.fetch(f"https://127.0.0.1:{server.server_port}{IMAGE_PATH}")
    finally:
        fetcher.close()
    assert by_name.status == status.SUCCESS and by_name.body[:2] == b"\xff\xd8", by_name.error
    assert by_address.status == status.SUCCESS, by_address.error
    # SNI carries the URL's host name; an IP address is never sent as SNI (RFC 6066).
    assert "localhost" in server.server_names and set(server.server_names) <= {"localhost", None}


def test_the_default_system_store_does_not_trust_a_private_ca(pki, tls_server) -> None:
    server = tls_server("valid")
    fetcher = _fetcher(pki, server, ca_bundle="")
    try:
        result = fetcher.fetch(f"https://localhost:{server.server_port}{IMAGE_PATH}")
    finally:
        fetcher.close()
    assert result.status == status.FAILED_TO_DOWNLOAD and "certificate" in result.error
    assert server.total_hits == 0


@pytest.mark.parametrize(
    ("leaf", "reason"),
    [("expired", "expired"), ("other_host", "mismatch"), ("self_signed", "self-signed")],
)
def test_bad_certificates_are_statuses_not_crashes(pki, tls_server, leaf: str, reason: str) -> None:
    server = tls_server(leaf)
    fetcher = _fetcher(pki, server)
    try:
        results = list(fetcher.fetch_many([f"https://localhost:{server.server_port}/img/{i}.jpg" for i in range(3)]))
    finally:
        fetcher.close()
    assert [r.status for r in results] == [status.FAILED_TO_DOWNLOAD] * 3
    assert all(reason in r.error for r in results), [r.error for r in results]
    assert all(r.attempts == 1 for r in results)  # a certificate does not get better in a second
    assert server.total_hits == 0  # no request was sent over a connection we did not trust


def test_keep_alive_reuses_a_connection_per_host_and_never_across_hosts(pki, tls_server) -> None:
    server = tls_server("valid")
    port = server.server_port

    def lookup(host: str, port: int, *args, **kwargs):
        # Two more names of the same server (its certificate has them): one on the allow-list, one not.
        if host in ("second.example", "rebound.example"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return socket.getaddrinfo(host, port, *args, **kwargs)

    resolver = Resolver(timeout_s=1.0, cache_hosts=10, lookup=lookup)
    allowed = [f"localhost:{port}", f"second.example:{port}"]
    fetcher = _fetcher(pki, server, resolver=resolver, per_host_requests_per_s=0, allowed_hosts=allowed)
    try:
        for i in range(3):
            assert fetcher.fetch(f"https://localhost:{port}/img/red-circle-gray-{i}.jpg").status == status.SUCCESS
        # robots.txt, tdmrep.json and three images over one connection
        assert (server.connections, server.total_hits) == (1, 5)
        assert fetcher.fetch(f"https://second.example:{port}{IMAGE_PATH}").status == status.SUCCESS
        assert server.connections == 2  # same address, another host name: a connection of its own
        assert "second.example" in server.server_names
        hits = server.total_hits
        rebound = fetcher.fetch(f"https://rebound.example:{port}{IMAGE_PATH}")
        assert rebound.status == status.BLOCKED_ADDRESS and "loopback" in rebound.error, rebound.error
        assert (server.connections, server.total_hits) == (2, hits)  # no idle connection was lent to it
    finally:
        fetcher.close()
        resolver.close()


class SilentlyClosingHandler(SyntheticImageHandler):
    """Promises keep-alive (HTTP/1.1, no Connection: close) and closes the connection after every answer anyway."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        super().do_GET()
        self.close_connection = True


def test_an_idle_connection_the_server_closed_is_never_reused(pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["valid"].cert, pki["valid"].key)
    server = serve_tls(context, SilentlyClosingHandler)
    fetcher = _fetcher(pki, server, respect_robots_txt=False, respect_tdmrep=False, per_host_requests_per_s=0)
    try:
        results = [fetcher.fetch(f"https://localhost:{server.server_port}{IMAGE_PATH}") for _ in range(3)]
    finally:
        fetcher.close()
        server.shutdown()
    assert [(r.status, r.attempts) for r in results] == [(status.SUCCESS, 1)] * 3, [r.error for r in results]
    assert server.connections == 3
