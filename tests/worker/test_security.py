"""TLS and mutual TLS on a real server, with certificates made by the openssl CLI for the test."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.certs import issue, make_ca
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .harness import RunningServer, make_settings, rpc_error, start_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger's
    client certificate from another CA."""
    d = tmp_path_factory.mktemp("certs")
    make_ca(d, subject="test-ca")
    issue("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1", d)
    issue("client", "scheduler", "extendedKeyUsage=clientAuth", d)
    other = d / "other"
    other.mkdir()
    make_ca(other, subject="other-ca")
    issue("client", "stranger", "extendedKeyUsage=clientAuth", other)
    return d


def _tls_server(loop: asyncio.AbstractEventLoop, root: Path, certs: Path, mutual: bool) -> RunningServer:
    settings = make_settings(
        root,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem" if mutual else None,
    )
    return start_server(loop, settings)


@pytest.fixture(scope="module")
def tls(aio_loop: asyncio.AbstractEventLoop, model_root: Path, certs: Path) -> Iterator[RunningServer]:
    running = _tls_server(aio_loop, model_root, certs, mutual=False)
    yield running
    running.stop(grace=0.5)


@pytest.fixture(scope="module")
def mtls(aio_loop: asyncio.AbstractEventLoop, model_root: Path, certs: Path) -> Iterator[RunningServer]:
    running = _tls_server(aio_loop, model_root, certs, mutual=True)
    yield running
    running.stop(grace=0.5)


def _secure_stub(server: RunningServer, certs: Path, client: Path | None = None) -> pb_grpc.ModelWorkerStub:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(client / "client.key").read_bytes() if client else None,
        certificate_chain=(client / "client.pem").read_bytes() if client else None,
    )
    return pb_grpc.ModelWorkerStub(grpc.secure_channel(f"localhost:{server.server.port}", creds))


def test_tls_serves_and_refuses_plaintext(tls: RunningServer, certs: Path) -> None:
    assert _secure_stub(tls, certs).ListArchitectures(pb.ListArchitecturesRequest(), timeout=10).architectures
    err = rpc_error(lambda: tls.stub().ListModels(pb.ListModelsRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls: RunningServer, certs: Path) -> None:
    assert _secure_stub(mtls, certs, client=certs).ListArchitectures(
        pb.ListArchitecturesRequest(), timeout=10
    )
    for client in (None, certs / "other"):
        stub = _secure_stub(mtls, certs, client=client)
        err = rpc_error(lambda stub=stub: stub.ListModels(pb.ListModelsRequest(), timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
