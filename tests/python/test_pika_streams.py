"""Stream queues through pika (texts as RabbitMQ 3.10+ gives them): declare
rules, consuming from an offset with the x-stream-offset header, acks that
return credit without deleting, and the operations streams refuse."""
import datetime

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

STREAM = {"x-queue-type": "stream"}


def consume(ch, q, offset, n, prefetch=10):
    """The first n deliveries from `offset` as (offset header, body), acked."""
    ch.basic_qos(prefetch_count=prefetch)
    got = []

    def on_message(c, method, props, body):
        got.append((props.headers["x-stream-offset"], body.decode()))
        c.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(q, on_message, arguments={"x-stream-offset": offset})
    deadline = ch.connection._impl.params.socket_timeout
    for _ in range(50):
        if len(got) >= n:
            break
        ch.connection.process_data_events(time_limit=deadline / 50)
    ch.basic_cancel(tag)
    return got


def test_stream_declare_rules(conn, uniq):
    q = uniq("stream")
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().queue_declare(q, durable=False, arguments=STREAM)
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        f"PRECONDITION_FAILED - invalid property 'non-durable' for queue '{q}' in vhost '/'"
    )
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().queue_declare(q, durable=True, arguments=dict(STREAM, **{"x-max-length": 5}))
    assert e.value.reply_text.endswith("of queue type rabbit_stream_queue")
    ch = conn.channel()
    ch.queue_declare(q, durable=True, arguments=dict(STREAM, **{"x-max-age": "7D"}))
    ch.queue_delete(q)


def test_stream_offsets_and_header(conn, uniq):
    ch = conn.channel()
    q = uniq("stream")
    ch.queue_declare(q, durable=True, arguments=STREAM)
    ch.confirm_delivery()
    for i in range(5):
        ch.basic_publish("", q, f"m{i}".encode(), pika.BasicProperties(headers={"i": i}))
    assert consume(conn.channel(), q, "first", 5) == [(i, f"m{i}") for i in range(5)]
    assert consume(conn.channel(), q, 3, 2) == [(3, "m3"), (4, "m4")]
    # Reading acked everything and deleted nothing.
    past = datetime.datetime(2020, 1, 1)
    assert len(consume(conn.channel(), q, past, 5)) == 5
    assert len(consume(conn.channel(), q, "1h", 5)) == 5
    ch.queue_delete(q)


def test_stream_refuses_get_and_needs_prefetch(params, conn, uniq):
    ch = conn.channel()
    q = uniq("stream")
    ch.queue_declare(q, durable=True, arguments=STREAM)
    with pytest.raises(ChannelClosedByBroker) as e:
        c = conn.channel()
        c.basic_consume(q, lambda *a: None)
        c.connection.process_data_events(time_limit=1)
    assert e.value.reply_code == 406
    assert "consumer prefetch count is not set" in e.value.reply_text
    other = pika.BlockingConnection(params)
    with pytest.raises(ConnectionClosedByBroker) as e:
        other.channel().basic_get(q)
    assert e.value.reply_code == 540
    assert e.value.reply_text == (
        f"NOT_IMPLEMENTED - basic.get not supported by stream queues queue '{q}' in vhost '/'"
    )
    conn.channel().queue_delete(q)
