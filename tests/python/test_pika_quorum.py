"""Quorum queues through pika: declaration rules, x-delivery-count and the
delivery limit dead-lettering with reason delivery_limit (RabbitMQ 4.0)."""
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker


def test_quorum_declare_rules(conn, uniq):
    ch = conn.channel()
    q = uniq("qq")
    ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_delete(q)
    bad = uniq("qq.bad")
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().queue_declare(bad, durable=False, arguments={"x-queue-type": "quorum"})
    assert e.value.reply_code == 406
    assert e.value.reply_text == (
        f"PRECONDITION_FAILED - invalid property 'non-durable' for queue '{bad}' in vhost '/'"
    )
    with pytest.raises(ChannelClosedByBroker) as e:
        conn.channel().queue_declare(
            bad, durable=True, arguments={"x-queue-type": "quorum", "x-max-priority": 5}
        )
    assert e.value.reply_code == 406
    assert e.value.reply_text.endswith("of queue type rabbit_quorum_queue")


def test_delivery_limit_dead_letters_with_reason(conn, uniq):
    ch = conn.channel()
    dlx = uniq("dlx")
    ch.exchange_declare(dlx, "fanout", auto_delete=True)
    dlq = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(dlq, dlx)
    q = uniq("qq.limit")
    ch.queue_declare(
        q,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": 2, "x-dead-letter-exchange": dlx},
    )
    ch.basic_publish("", q, b"poison")
    for n in range(3):
        method, props, body = ch.basic_get(q, auto_ack=False)
        assert body == b"poison"
        headers = props.headers or {}
        if n == 0:
            assert "x-delivery-count" not in headers
        else:
            assert headers["x-delivery-count"] == n
        ch.basic_nack(method.delivery_tag, requeue=True)
    assert ch.basic_get(q, auto_ack=True) == (None, None, None)
    method, props, body = ch.basic_get(dlq, auto_ack=True)
    assert body == b"poison"
    death = props.headers["x-death"][0]
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == q
    assert death["count"] == 1
    ch.queue_delete(q)
