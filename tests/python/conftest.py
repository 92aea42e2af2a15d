"""Fixtures for the pika client suite.

`amqp_url` is the broker under test: env WARREN_TEST_URI if set; otherwise the
warren binary (env WARREN_BIN, default target/debug/warren under the repo root)
is started on free ports with a temporary data dir and killed at the end.
"""
import contextlib
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import uuid

import pika
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# The Stream protocol port of the broker under test (set with the broker).
_STREAM_PORT = {"port": None}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"warren exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"warren did not accept connections on port {port} within {timeout}s")


def _broker_binary():
    """The warren binary: env WARREN_BIN, default target/debug/warren under the repo root."""
    binary = pathlib.Path(os.environ.get("WARREN_BIN", "target/debug/warren"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not binary.exists():
        pytest.fail(f"broker binary {binary} not found (build it, set WARREN_BIN, or set WARREN_TEST_URI)")
    return binary


@contextlib.contextmanager
def broker_process(log_dir, env, wait_ports):
    """The warren binary running with `env` added to the environment (its output
    in `log_dir`/warren.log) until the block ends, once it accepts connections on
    each of `wait_ports`."""
    binary = _broker_binary()
    full_env = dict(os.environ)
    full_env.update(env)
    log = open(os.path.join(str(log_dir), "warren.log"), "wb")
    proc = subprocess.Popen([str(binary)], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT))
    try:
        for port in wait_ports:
            _wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=str(cwd), check=True, capture_output=True)


def make_ca(d, name, cn):
    """A self-signed CA `name`.pem / `name`.key in `d` with CN `cn`."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def issue(d, ca, name, subject, ext):
    """A key and a certificate `name`.key / `name`.pem in `d` signed by the CA
    `ca` (file prefix), with the x509 extensions `ext`."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (pathlib.Path(d) / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d)


SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\n"


@pytest.fixture(scope="session")
def amqp_url():
    url = os.environ.get("WARREN_TEST_URI")
    if url:
        port = os.environ.get("WARREN_TEST_STREAM_PORT")
        _STREAM_PORT["port"] = int(port) if port else None
        yield url
        return
    amqp_port = _free_port()
    admin_port = _free_port()
    while admin_port == amqp_port:
        admin_port = _free_port()
    stream_port = _free_port()
    while stream_port in (amqp_port, admin_port):
        stream_port = _free_port()
    _STREAM_PORT["port"] = stream_port
    with tempfile.TemporaryDirectory(prefix="warren-pytest-") as data_dir:
        env = dict(
            WARREN_AMQP_PORT=str(amqp_port),
            WARREN_ADMIN_PORT=str(admin_port),
            WARREN_DATA_DIR=data_dir,
            WARREN_STREAM__LISTENERS__TCP__DEFAULT=str(stream_port),
        )
        with broker_process(data_dir, env, [amqp_port]):
            yield f"amqp://guest:guest@127.0.0.1:{amqp_port}/%2F"


@pytest.fixture
def params(amqp_url):
    p = pika.URLParameters(amqp_url)
    p.socket_timeout = 5
    p.blocked_connection_timeout = 5
    return p


@pytest.fixture
def conn(params):
    c = pika.BlockingConnection(params)
    yield c
    if c.is_open:
        c.close()


@pytest.fixture
def ch(conn):
    return conn.channel()


@pytest.fixture
def uniq():
    def make(prefix="t"):
        return f"pytest.{prefix}.{uuid.uuid4().hex[:16]}"
    return make


@pytest.fixture
def stream_port(amqp_url):
    """The broker's Stream protocol port (WARREN_TEST_STREAM_PORT with WARREN_TEST_URI)."""
    port = _STREAM_PORT["port"]
    if port is None:
        pytest.skip("WARREN_TEST_URI set without WARREN_TEST_STREAM_PORT")
    return port
