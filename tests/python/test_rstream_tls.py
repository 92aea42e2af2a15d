"""The Stream protocol over TLS (`stream.listeners.ssl`) with the Python
`rstream` client (skipped when it or openssl is missing, or when the suite runs
against an external broker): publish with confirms and consume over TLS with
PLAIN, then with SASL EXTERNAL as the client certificate's CN. Starts its own
broker with certificates made here by the openssl command."""
import asyncio
import os
import shutil
import ssl
import tempfile
import uuid

import pytest

rstream = pytest.importorskip("rstream")
from rstream import (  # noqa: E402
    AMQPMessage,
    Consumer,
    ConsumerOffsetSpecification,
    OffsetType,
    Producer,
    amqp_decoder,
)
from rstream.constants import SlasMechanism  # noqa: E402

from conftest import CLIENT_EXT, SERVER_EXT, _free_port, broker_process, issue, make_ca  # noqa: E402


def _pki(d):
    """ca.pem, server.pem/key (localhost, 127.0.0.1) and client.pem/key (CN=guest)."""
    make_ca(d, "ca", "rstream test CA")
    issue(d, "ca", "server", "/CN=localhost", SERVER_EXT)
    issue(d, "ca", "client", "/O=rstream tests/CN=guest", CLIENT_EXT)


@pytest.fixture(scope="module")
def tls_broker():
    """(stream TLS port, certificate directory) of a broker of its own."""
    if os.environ.get("WARREN_TEST_URI"):
        pytest.skip("runs its own broker (not against WARREN_TEST_URI)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ports = set()
    while len(ports) < 5:
        ports.add(_free_port())
    amqp, admin, amqps, stream, stream_tls = sorted(ports)
    with tempfile.TemporaryDirectory(prefix="warren-rstream-tls-") as d:
        _pki(d)
        env = dict(
            WARREN_AMQP_PORT=str(amqp),
            WARREN_ADMIN_PORT=str(admin),
            WARREN_DATA_DIR=os.path.join(d, "data"),
            WARREN_LISTENERS__SSL__DEFAULT=str(amqps),
            WARREN_STREAM__LISTENERS__TCP__DEFAULT=str(stream),
            WARREN_STREAM__LISTENERS__SSL__DEFAULT=str(stream_tls),
            # The certificate's name (the default is the host name).
            WARREN_STREAM__ADVERTISED_HOST="localhost",
            WARREN_SSL_OPTIONS__CACERTFILE=os.path.join(d, "ca.pem"),
            WARREN_SSL_OPTIONS__CERTFILE=os.path.join(d, "server.pem"),
            WARREN_SSL_OPTIONS__KEYFILE=os.path.join(d, "server.key"),
            WARREN_SSL_OPTIONS__VERIFY="verify_peer",
            WARREN_SSL_OPTIONS__FAIL_IF_NO_PEER_CERT="false",
        )
        with broker_process(d, env, [stream_tls]):
            yield stream_tls, d


def _context(d, client_cert):
    ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.pem"))
    if client_cert:
        ctx.load_cert_chain(os.path.join(d, "client.pem"), os.path.join(d, "client.key"))
    return ctx


async def _round_trip(port, d, client_cert, mechanism):
    stream = f"rstream.tls.{uuid.uuid4().hex[:12]}"
    kw = dict(
        ssl_context=_context(d, client_cert),
        username="guest",
        password="guest" if mechanism == SlasMechanism.MechanismPlain else "",
        sasl_configuration_mechanism=mechanism,
    )
    async with Producer("localhost", port, **kw) as p:
        await p.create_stream(stream)
        for i in range(10):
            await p.send_wait(stream, AMQPMessage(body=f"m{i}".encode()))
    got = []
    done = asyncio.Event()

    async def on_message(msg, ctx):
        got.append(bytes(msg.body))
        if len(got) >= 10:
            done.set()

    async with Consumer("localhost", port, **kw) as c:
        await c.subscribe(stream, on_message, decoder=amqp_decoder,
                          offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None))
        await asyncio.wait_for(done.wait(), 10)
    async with Producer("localhost", port, **kw) as p:
        await p.delete_stream(stream)
    return got[:10]


def test_publish_and_consume_over_tls_with_plain(tls_broker):
    port, d = tls_broker
    got = asyncio.run(asyncio.wait_for(_round_trip(port, d, False, SlasMechanism.MechanismPlain), 60))
    assert got == [f"m{i}".encode() for i in range(10)]


def test_external_logs_in_as_the_certificate_cn(tls_broker):
    port, d = tls_broker
    got = asyncio.run(asyncio.wait_for(_round_trip(port, d, True, SlasMechanism.MechanismExternal), 60))
    assert got == [f"m{i}".encode() for i in range(10)]
