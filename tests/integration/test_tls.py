"""TLS end to end: a `dsched scheduler` with TLS flags, real `dask worker`s (with nannies)
with theirs, and a real `distributed.Client` with a client certificate, all on 127.0.0.1.

A CA and the certificates are generated here with ``cryptography``. Checked: a computation,
a gather and a scatter proxied through the scheduler (its outgoing TLS connections to the
workers), ``Client.run`` (broadcast) and ``Client.restart`` (nanny kill); clients without a
certificate, with one from another CA, and plain tcp:// are refused, without disturbing a
connected client; the config keys (``distributed.comm.tls.*``, ``require-encryption``)
work without flags; and misconfigurations fail with clear messages.

``DSCHED_TEST_SCHEDULER=dask`` runs the same tests against `dask scheduler`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from operator import add
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed import Client
from distributed.comm import connect as distributed_connect
from distributed.security import Security

from dsched.testing.cluster import (
    LOCALHOST,
    ManagedProcess,
    read_scheduler_address,
    scheduler_command,
    worker_command,
)
from dsched.testing.workloads import inc, times_ten

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCHEDULER_KIND = os.environ.get("DSCHED_TEST_SCHEDULER", "dsched")
N_WORKERS = 2
STARTUP_TIMEOUT_S = 60
REFUSAL_TIMEOUT_S = 3


# -- certificates -------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@dataclass
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_file: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        cert_file = directory / f"{name}.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, cert_file)

    def issue(self, directory: Path, name: str) -> tuple[str, str]:
        """A certificate for both TLS server and client use; returns (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_file)
        return str(cert_file), str(key_file)


@dataclass
class Certificates:
    ca: str
    scheduler: tuple[str, str]
    worker: tuple[str, str]
    client: tuple[str, str]
    stranger: tuple[str, str]  # signed by another CA

    def client_security(self) -> Security:
        return Security(
            tls_ca_file=self.ca,
            tls_client_cert=self.client[0],
            tls_client_key=self.client[1],
            require_encryption=True,
        )

    def flags(self, role: str) -> list[str]:
        cert, key = getattr(self, role)
        return ["--tls-ca-file", self.ca, "--tls-cert", cert, "--tls-key", key]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority.create(directory, "dsched-test-ca")
    other_ca = CertificateAuthority.create(directory, "some-other-ca")
    return Certificates(
        ca=str(ca.cert_file),
        scheduler=ca.issue(directory, "scheduler"),
        worker=ca.issue(directory, "worker"),
        client=ca.issue(directory, "client"),
        stranger=other_ca.issue(directory, "stranger"),
    )


# -- processes ----------------------------------------------------------------------------------


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


def _start_scheduler(
    directory: Path, command: list[str], env: dict[str, str] | None = None
) -> tuple[ManagedProcess, str]:
    scheduler_file = directory / "scheduler.json"
    process = ManagedProcess.start(
        "scheduler", command, directory / "scheduler.log", _environment(env)
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (address := read_scheduler_address(scheduler_file)) is None:
        if not process.is_running() or time.monotonic() > deadline:
            process.request_stop()
            process.wait_stopped(10)
            pytest.fail("the TLS scheduler did not start\n" + process.describe())
        time.sleep(0.05)
    return process, address


def _stop(processes: list[ManagedProcess]) -> None:
    for process in processes:
        process.request_stop()
    for process in processes:
        process.wait_stopped(15)


def _program(kind: str) -> list[str]:
    # The HTTP server starts even without the dashboard: keep it on 127.0.0.1, a free port.
    local_http = ["--dashboard-address", "127.0.0.1:0"]
    if kind == "dsched":
        return [sys.executable, "-m", "dsched", "scheduler", *local_http]
    return [sys.executable, "-m", "distributed.cli.dask_scheduler", *local_http]


@dataclass
class TLSCluster:
    address: str
    scheduler: ManagedProcess
    workers: list[ManagedProcess]

    def describe(self) -> str:
        return "\n".join(p.describe(30) for p in [self.scheduler, *self.workers])


@pytest.fixture(scope="module")
def tls_cluster(
    certs: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TLSCluster]:
    directory = tmp_path_factory.mktemp("tls-cluster")
    # `dsched scheduler --host 127.0.0.1 --port 0 ... --tls-ca-file --tls-cert --tls-key`:
    # the TLS flags alone make it listen on tls:// (as `dask scheduler` does).
    scheduler, address = _start_scheduler(
        directory,
        scheduler_command(SCHEDULER_KIND, directory / "scheduler.json", certs.flags("scheduler")),
    )
    workers: list[ManagedProcess] = []
    try:
        assert address.startswith(f"tls://{LOCALHOST}:"), address
        for index in range(N_WORKERS):
            local_directory = directory / f"worker-{index}"
            local_directory.mkdir()
            workers.append(
                ManagedProcess.start(
                    f"worker {index}",
                    [*worker_command(address, local_directory), *certs.flags("worker")],
                    directory / f"worker-{index}.log",
                    _environment(),
                )
            )
        cluster = TLSCluster(address, scheduler, workers)
        with Client(address, security=certs.client_security(), timeout=STARTUP_TIMEOUT_S) as c:
            try:
                c.wait_for_workers(N_WORKERS, timeout=STARTUP_TIMEOUT_S)
            except TimeoutError:
                pytest.fail("the TLS workers did not register\n" + cluster.describe())
        yield cluster
    finally:
        _stop([*workers, scheduler])


@pytest.fixture
def tls_client(tls_cluster: TLSCluster, certs: Certificates) -> Iterator[Client]:
    with Client(
        tls_cluster.address, security=certs.client_security(), timeout=STARTUP_TIMEOUT_S
    ) as client:
        yield client


# -- tests --------------------------------------------------------------------------------------


def test_compute_gather_and_scatter_over_tls(tls_cluster: TLSCluster, tls_client: Client):
    client = tls_client
    workers = client.scheduler_info()["workers"]
    assert len(workers) == N_WORKERS
    assert all(address.startswith("tls://") for address in workers), workers

    futures = client.map(inc, range(50))
    total = client.submit(sum, futures)
    assert total.result(timeout=60) == sum(range(1, 51))
    # direct=False: the scheduler fetches the results from the workers (get_data over its
    # own TLS connections) and forwards them.
    assert client.gather(futures, direct=False) == list(range(1, 51))

    # Scatter through the scheduler (update_data to the workers over TLS), then use the data.
    scattered = client.scatter(list(range(10)), direct=False)
    assert client.gather(client.map(times_ten, scattered), direct=False) == [
        10 * i for i in range(10)
    ]
    everywhere = client.scatter(7, broadcast=True, direct=False)
    assert len(client.who_has([everywhere])[everywhere.key]) == N_WORKERS
    assert client.submit(add, everywhere, 1).result(timeout=60) == 8

    # broadcast: the scheduler's RPC to every worker.
    assert sorted(client.run(lambda: 42).values()) == [42] * N_WORKERS


def test_restart_kills_workers_through_their_nannies_over_tls(
    tls_cluster: TLSCluster, tls_client: Client
):
    client = tls_client
    before = set(client.scheduler_info()["workers"])
    client.restart(timeout=60)
    client.wait_for_workers(N_WORKERS, timeout=60)
    after = set(client.scheduler_info()["workers"])
    assert len(after) == N_WORKERS
    assert after != before  # new worker processes, new ports
    assert client.submit(inc, 1).result(timeout=60) == 2


def _refused(address: str, context: ssl.SSLContext | None) -> None:
    async def attempt() -> None:
        kwargs = {"ssl_context": context} if context is not None else {}
        comm = await distributed_connect(address, timeout=REFUSAL_TIMEOUT_S, **kwargs)
        # TLS 1.3 may let the client finish its side of the handshake before the server
        # rejects the certificate: then the first read fails.
        await comm.write({"op": "identity", "reply": True})
        await comm.read()

    with pytest.raises(OSError):  # distributed's CommClosedError is an OSError
        asyncio.run(attempt())


def test_unauthenticated_peers_are_refused_without_disturbing_others(
    tls_cluster: TLSCluster, tls_client: Client, certs: Certificates
):
    client = tls_client
    first = client.submit(inc, 10)
    assert first.result(timeout=60) == 11

    # A CA but no client certificate.
    no_certificate = ssl.create_default_context(cafile=certs.ca)
    no_certificate.check_hostname = False
    _refused(tls_cluster.address, no_certificate)

    # A certificate from another CA.
    stranger = ssl.create_default_context(cafile=certs.ca)
    stranger.check_hostname = False
    stranger.load_cert_chain(*certs.stranger)
    _refused(tls_cluster.address, stranger)

    # A whole Client with the stranger's certificate.
    with pytest.raises((OSError, TimeoutError)):
        Client(
            tls_cluster.address,
            security=Security(
                tls_ca_file=certs.ca,
                tls_client_cert=certs.stranger[0],
                tls_client_key=certs.stranger[1],
                require_encryption=True,
            ),
            timeout=REFUSAL_TIMEOUT_S,
            set_as_default=False,
        )

    # Plain TCP to the TLS port.
    _refused(tls_cluster.address.replace("tls://", "tcp://"), None)

    # The connected client, the workers and the scheduler carry on.
    assert tls_cluster.scheduler.is_running()
    assert first.result() == 11
    assert client.gather(client.map(inc, range(20)), direct=False) == list(range(1, 21))
    assert len(client.scheduler_info()["workers"]) == N_WORKERS


def test_config_keys_alone_enable_tls(certs: Certificates, tmp_path: Path):
    """distributed.comm.tls.* and require-encryption from the environment, no TLS flags."""
    cert, key = certs.scheduler
    env = {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": certs.ca,
        "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT": cert,
        "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY": key,
        "DASK_DISTRIBUTED__COMM__TLS__MIN_VERSION": "1.3",
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
    }
    command = [
        *_program(SCHEDULER_KIND),
        "--host", f"tls://{LOCALHOST}:0",
        "--no-dashboard",
        "--scheduler-file", str(tmp_path / "scheduler.json"),
    ]  # fmt: skip
    scheduler, address = _start_scheduler(tmp_path, command, env)
    try:
        assert address.startswith(f"tls://{LOCALHOST}:")
        with Client(address, security=certs.client_security(), timeout=30) as client:
            assert client.scheduler_info()["address"] == address
        # TLS 1.2 is below the configured minimum.
        old = ssl.create_default_context(cafile=certs.ca)
        old.check_hostname = False
        old.load_cert_chain(*certs.client)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        _refused(address, old)
    finally:
        _stop([scheduler])


@pytest.mark.skipif(SCHEDULER_KIND != "dsched", reason="dsched's own error messages")
@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--protocol", "tls"], {}, "needs a CA file and a certificate"),
        (["--protocol", "tcp", "--tls-ca-file", "CA", "--tls-cert", "C"], {}, "invalid TLS"),
        (["--protocol", "tcp", "--tls-ca-file", "CA"], {}, "refusing to listen on tcp://"),
        (["--host", "tls://127.0.0.1", "--protocol", "tcp"], {}, "contradicts"),
        ([], {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}, "needs a CA file"),
    ],
)
def test_tls_misconfiguration_fails_clearly(flags, env, message, certs: Certificates):
    flags = [
        {"CA": certs.ca, "C": str(Path(certs.ca).parent / "missing.pem")}.get(f, f) for f in flags
    ]
    host = [] if "--host" in flags else ["--host", LOCALHOST]
    out = subprocess.run(
        [*_program("dsched"), *host, "--port", "0", *flags],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_environment(env),
    )
    assert out.returncode != 0
    assert message in out.stderr
