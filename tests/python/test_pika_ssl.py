"""pika over TLS (ssl_options): PLAIN and EXTERNAL logins, verify_peer refusals.

Starts its own warren binary with AMQPS configured through WARREN_* variables
(RabbitMQ's key names: listeners.ssl.default, ssl_options.*), with a CA, server and
client certificates made by the openssl command line. Skipped against an external
broker (WARREN_TEST_URI) or without openssl.
"""
import base64
import json
import os
import pathlib
import shutil
import ssl
import tempfile
import urllib.request

import pika
import pytest
from pika.exceptions import AMQPConnectionError

from conftest import CLIENT_EXT, SERVER_EXT, _free_port, broker_process, issue, make_ca

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("WARREN_TEST_URI")) or shutil.which("openssl") is None,
    reason="needs the warren binary and openssl",
)


@pytest.fixture(scope="module")
def tls_broker():
    with tempfile.TemporaryDirectory(prefix="warren-pytest-tls-") as tmp:
        d = pathlib.Path(tmp)
        make_ca(d, "ca", "pytest CA")
        make_ca(d, "other", "someone else")
        issue(d, "ca", "server", "/CN=localhost", SERVER_EXT)
        issue(d, "ca", "alice", "/O=pytest/CN=alice", CLIENT_EXT)
        issue(d, "other", "stranger", "/CN=alice", CLIENT_EXT)
        amqp_port, amqps_port, admin_port = _free_port(), _free_port(), _free_port()
        env = dict(
            WARREN_BIND="127.0.0.1",
            WARREN_AMQP_PORT=str(amqp_port),
            WARREN_ADMIN_PORT=str(admin_port),
            WARREN_DATA_DIR=str(d / "data"),
            WARREN_LISTENERS__SSL__DEFAULT=str(amqps_port),
            WARREN_SSL_OPTIONS__CACERTFILE=str(d / "ca.pem"),
            WARREN_SSL_OPTIONS__CERTFILE=str(d / "server.pem"),
            WARREN_SSL_OPTIONS__KEYFILE=str(d / "server.key"),
            WARREN_SSL_OPTIONS__VERIFY="verify_peer",
            WARREN_SSL_OPTIONS__FAIL_IF_NO_PEER_CERT="false",
        )
        with broker_process(d, env, [amqps_port, admin_port]):
            yield {"dir": d, "port": amqps_port, "admin": admin_port}


def _api(broker, method, path, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{broker['admin']}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read()
        return json.loads(text) if text else None


def _params(broker, client=None, credentials=None):
    d = broker["dir"]
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(d / f"{client}.pem"), str(d / f"{client}.key"))
    return pika.ConnectionParameters(
        "localhost", broker["port"], ssl_options=pika.SSLOptions(ctx, "localhost"),
        credentials=credentials or pika.PlainCredentials("guest", "guest"),
        socket_timeout=5, connection_attempts=1)


def _round_trip(conn, body):
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", q, body)
    method, _, got = ch.basic_get(q, auto_ack=True)
    assert got == body


def test_plain_login_over_tls_publishes_and_gets(tls_broker):
    conn = pika.BlockingConnection(_params(tls_broker))
    _round_trip(conn, b"over tls")
    rows = [c for c in _api(tls_broker, "GET", "/api/connections") if c["user"] == "guest"]
    assert rows and rows[0]["ssl"] is True
    assert rows[0]["ssl_protocol"] in ("tlsv1.2", "tlsv1.3")
    conn.close()


def test_external_logs_in_as_the_certificate_cn(tls_broker):
    _api(tls_broker, "PUT", "/api/users/alice", {"password_hash": "", "tags": ""})
    _api(tls_broker, "PUT", "/api/permissions/%2F/alice",
         {"configure": ".*", "write": ".*", "read": ".*"})
    conn = pika.BlockingConnection(
        _params(tls_broker, "alice", pika.credentials.ExternalCredentials()))
    _round_trip(conn, b"as alice")
    rows = [c for c in _api(tls_broker, "GET", "/api/connections") if c["user"] == "alice"]
    assert rows and rows[0]["peer_cert_subject"] == "CN=alice,O=pytest"
    conn.close()
    # alice has no password: PLAIN is refused even with her certificate.
    with pytest.raises(AMQPConnectionError):
        pika.BlockingConnection(
            _params(tls_broker, "alice", pika.PlainCredentials("alice", "")))


def test_untrusted_client_certificate_is_refused(tls_broker):
    good = pika.BlockingConnection(_params(tls_broker))
    with pytest.raises(AMQPConnectionError):
        c = pika.BlockingConnection(
            _params(tls_broker, "stranger", pika.credentials.ExternalCredentials()))
        # TLS 1.3 reports a refused client certificate after the handshake.
        c.channel()
    _round_trip(good, b"undisturbed")
    good.close()
