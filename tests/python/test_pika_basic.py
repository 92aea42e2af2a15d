"""Main client flows through pika's BlockingConnection."""
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, UnroutableError


def _declare_tmp(ch, name=""):
    return ch.queue_declare(name, exclusive=True).method.queue


def _count(ch, q):
    return ch.queue_declare(q, passive=True).method.message_count


def test_publish_and_get(ch):
    q = _declare_tmp(ch)
    props = pika.BasicProperties(content_type="text/plain", headers={"k": "v"}, delivery_mode=2)
    ch.basic_publish("", q, b"hello", props)
    method, got_props, body = ch.basic_get(q, auto_ack=False)
    assert body == b"hello"
    assert method.routing_key == q
    assert method.redelivered is False
    assert method.message_count == 0
    assert got_props.content_type == "text/plain"
    assert got_props.headers == {"k": "v"}
    assert got_props.delivery_mode == 2
    ch.basic_ack(method.delivery_tag)
    # get-empty
    assert ch.basic_get(q, auto_ack=True) == (None, None, None)


def test_server_named_queue(ch):
    q = _declare_tmp(ch)
    assert q.startswith("amq.gen-")


def test_consume_with_ack(conn, ch):
    q = _declare_tmp(ch)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    received = []

    def on_msg(channel, method, properties, body):
        received.append(body)
        channel.basic_ack(method.delivery_tag)
        if len(received) == 3:
            channel.stop_consuming()

    tag = ch.basic_consume(q, on_msg)
    assert tag.startswith("ctag") or tag
    conn.call_later(5, ch.stop_consuming)
    ch.start_consuming()
    assert received == [b"m0", b"m1", b"m2"]
    assert _count(ch, q) == 0


def test_qos_prefetch(ch):
    q = _declare_tmp(ch)
    for i in range(5):
        ch.basic_publish("", q, f"m{i}".encode())
    ch.basic_qos(prefetch_count=2)
    got = []
    for method, _props, body in ch.consume(q, inactivity_timeout=0.3):
        if method is None:
            break
        got.append((method.delivery_tag, body))
    # Only two outstanding unacked deliveries.
    assert [b for _, b in got] == [b"m0", b"m1"]
    assert _count(ch, q) == 3
    ch.basic_ack(got[-1][0], multiple=True)
    more = []
    for method, _props, body in ch.consume(q, inactivity_timeout=0.3):
        if method is None:
            break
        more.append(body)
        ch.basic_ack(method.delivery_tag)
    assert more == [b"m2", b"m3", b"m4"]
    ch.cancel()


def test_topic_routing(ch, uniq):
    ex = uniq("topic")
    ch.exchange_declare(ex, "topic", auto_delete=True)
    q_star = _declare_tmp(ch)
    q_hash = _declare_tmp(ch)
    ch.queue_bind(q_star, ex, "logs.*.error")
    ch.queue_bind(q_hash, ex, "logs.#")
    ch.confirm_delivery()
    for key in ["logs.app.error", "logs.app.info", "logs", "logs.a.b.error", "other.app.error"]:
        ch.basic_publish(ex, key, key.encode())

    def drain(q):
        out = []
        while True:
            m, _, b = ch.basic_get(q, auto_ack=True)
            if m is None:
                return out
            out.append(b.decode())

    assert drain(q_star) == ["logs.app.error"]
    assert drain(q_hash) == ["logs.app.error", "logs.app.info", "logs", "logs.a.b.error"]


def test_fanout_and_direct(ch, uniq):
    fx = uniq("fanout")
    ch.exchange_declare(fx, "fanout", auto_delete=True)
    qs = [_declare_tmp(ch) for _ in range(2)]
    for q in qs:
        ch.queue_bind(q, fx)
    ch.confirm_delivery()
    ch.basic_publish(fx, "anything", b"f")
    for q in qs:
        assert ch.basic_get(q, auto_ack=True)[2] == b"f"
    qd = _declare_tmp(ch)
    key = uniq("key")
    ch.queue_bind(qd, "amq.direct", key)
    ch.basic_publish("amq.direct", key, b"d")
    ch.basic_publish("amq.direct", key + ".other", b"x")
    assert ch.basic_get(qd, auto_ack=True)[2] == b"d"
    assert ch.basic_get(qd, auto_ack=True) == (None, None, None)


def test_confirms_ack(ch):
    q = _declare_tmp(ch)
    ch.confirm_delivery()
    for i in range(20):
        # With confirms on, BlockingChannel.basic_publish waits for the ack and
        # raises on nack.
        ch.basic_publish("", q, f"{i}".encode())
    assert _count(ch, q) == 20


def test_confirms_unroutable_mandatory_raises(ch, uniq):
    ch.confirm_delivery()
    with pytest.raises(UnroutableError) as exc:
        ch.basic_publish("amq.direct", uniq("nobody"), b"bounce", mandatory=True)
    returned = exc.value.messages
    assert len(returned) == 1
    assert returned[0].method.reply_code == 312
    assert returned[0].method.reply_text == "NO_ROUTE"
    assert returned[0].body == b"bounce"
    # Not mandatory: silently dropped, no exception.
    ch.basic_publish("amq.direct", uniq("nobody"), b"dropped")
    assert ch.is_open


def test_basic_return_callback(conn, ch, uniq):
    returns = []
    ch.add_on_return_callback(lambda channel, method, props, body: returns.append((method, body)))
    ch.basic_publish("", uniq("nobody"), b"r", mandatory=True)
    # A synchronous round trip makes sure the return has been received.
    _declare_tmp(ch)
    conn.process_data_events(time_limit=0)
    assert len(returns) == 1
    method, body = returns[0]
    assert method.reply_code == 312
    assert method.exchange == ""
    assert body == b"r"


def test_dead_consumer_messages_requeued(params, ch):
    q = ch.queue_declare("", exclusive=False, auto_delete=False).method.queue
    try:
        for i in range(3):
            ch.basic_publish("", q, f"m{i}".encode())
        c2 = pika.BlockingConnection(params)
        ch2 = c2.channel()
        got = []
        for method, _p, body in ch2.consume(q, inactivity_timeout=0.3):
            if method is None:
                break
            got.append(body)
        assert got == [b"m0", b"m1", b"m2"]
        assert _count(ch, q) == 0
        c2.close()  # dies without acking
        for i in range(3):
            method, _p, body = ch.basic_get(q, auto_ack=True)
            assert body == f"m{i}".encode()
            assert method.redelivered is True
    finally:
        ch.queue_delete(q)


def test_reject_and_nack(ch):
    q = _declare_tmp(ch)
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    m, _, _ = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=True)
    m, _, body = ch.basic_get(q)
    assert body == b"m0" and m.redelivered
    ch.basic_nack(m.delivery_tag, requeue=False)
    m1, _, _ = ch.basic_get(q)
    m2, _, _ = ch.basic_get(q)
    ch.basic_nack(m2.delivery_tag, multiple=True, requeue=False)
    assert ch.basic_get(q) == (None, None, None)
    assert _count(ch, q) == 0


def test_purge_and_delete_counts(ch, uniq):
    q = uniq("pd")
    ch.queue_declare(q)
    ch.confirm_delivery()
    for _ in range(4):
        ch.basic_publish("", q, b"x")
    assert ch.queue_purge(q).method.message_count == 4
    ch.basic_publish("", q, b"y")
    assert ch.queue_delete(q).method.message_count == 1


def test_passive_missing_queue_404(conn, uniq):
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.queue_declare(uniq("missing"), passive=True)
    assert exc.value.reply_code == 404
    assert conn.is_open
    assert conn.channel().is_open


def test_passive_missing_exchange_404(conn, uniq):
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.exchange_declare(uniq("missing"), passive=True)
    assert exc.value.reply_code == 404


def test_exchange_redeclare_other_type_406(conn, uniq):
    ch = conn.channel()
    ex = uniq("x")
    ch.exchange_declare(ex, "direct", auto_delete=True)
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.exchange_declare(ex, "topic", auto_delete=True)
    assert exc.value.reply_code == 406
    conn.channel().exchange_delete(ex)


def test_queue_redeclare_other_flags_406(conn, uniq):
    ch = conn.channel()
    q = uniq("q")
    ch.queue_declare(q, durable=True)
    try:
        with pytest.raises(ChannelClosedByBroker) as exc:
            ch.queue_declare(q, durable=False)
        assert exc.value.reply_code == 406
    finally:
        conn.channel().queue_delete(q)


def test_amq_exchange_declare_403(conn):
    ch = conn.channel()
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.exchange_declare("amq.pytest-forbidden", "direct")
    assert exc.value.reply_code == 403


def test_exclusive_queue_locked_405(params, ch, uniq):
    # A named queue: redeclaring a server-named amq.gen-* queue is 403 (reserved prefix)
    # on RabbitMQ before exclusivity is even checked.
    q = ch.queue_declare(uniq("excl"), exclusive=True).method.queue
    other = pika.BlockingConnection(params)
    try:
        och = other.channel()
        with pytest.raises(ChannelClosedByBroker) as exc:
            och.queue_declare(q)
        assert exc.value.reply_code == 405
    finally:
        other.close()


def test_queue_delete_if_empty_406(conn, uniq):
    ch = conn.channel()
    q = uniq("ifempty")
    ch.queue_declare(q)
    ch.confirm_delivery()
    ch.basic_publish("", q, b"x")
    with pytest.raises(ChannelClosedByBroker) as exc:
        ch.queue_delete(q, if_empty=True)
    assert exc.value.reply_code == 406
    assert conn.channel().queue_delete(q).method.message_count == 1


def test_tx_commit_rollback(ch):
    q = _declare_tmp(ch)
    ch.tx_select()
    ch.basic_publish("", q, b"rolled")
    ch.tx_rollback()
    ch.basic_publish("", q, b"committed")
    ch.tx_commit()
    assert _count(ch, q) == 1
    assert ch.basic_get(q, auto_ack=True)[2] == b"committed"
