"""The Stream protocol with the Python `rstream` client (skipped when it is not
installed): create/delete, publish with confirms, consume from an offset
specification, server-side offsets, publisher deduplication, and a stream
written over AMQP 0-9-1 (pika) read over the stream protocol."""
import asyncio
import uuid

import pika
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


def _name(prefix):
    return f"rstream.{prefix}.{uuid.uuid4().hex[:12]}"


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _producer(port):
    return Producer("127.0.0.1", port, username="guest", password="guest")


def _consumer(port):
    return Consumer("127.0.0.1", port, username="guest", password="guest")


async def _consume(port, stream, n, offset):
    """The first `n` (offset, body) pairs delivered from `offset`."""
    got = []
    done = asyncio.Event()

    async def on_message(msg, ctx):
        got.append((ctx.offset, bytes(msg.body) if not isinstance(msg, bytes) else msg))
        if len(got) >= n:
            done.set()

    async with _consumer(port) as c:
        await c.subscribe(stream, on_message, decoder=amqp_decoder, offset_specification=offset)
        await asyncio.wait_for(done.wait(), 10)
    return got[:n]


def test_publish_confirm_and_consume_from_first(stream_port):
    stream = _name("basic")

    async def scenario():
        async with _producer(stream_port) as p:
            await p.create_stream(stream)
            for i in range(20):
                await p.send_wait(stream, AMQPMessage(body=f"m{i}".encode()))
        got = await _consume(stream_port, stream, 20, ConsumerOffsetSpecification(OffsetType.FIRST))
        assert [b for _, b in got] == [f"m{i}".encode() for i in range(20)]
        assert [o for o, _ in got] == list(range(20))
        got = await _consume(stream_port, stream, 1, ConsumerOffsetSpecification(OffsetType.OFFSET, 15))
        assert got[0] == (15, b"m15")
        async with _producer(stream_port) as p:
            await p.delete_stream(stream)
            assert not await p.stream_exists(stream)

    _run(scenario())


def test_dedup_and_stored_offsets(stream_port):
    stream = _name("dedup")

    async def scenario():
        async with _producer(stream_port) as p:
            await p.create_stream(stream)
            for i in range(5):
                await p.send_wait(stream, AMQPMessage(body=f"a{i}".encode()), publisher_name="pub")
        # A new producer with the same name continues after the stored sequence.
        async with _producer(stream_port) as p:
            for i in range(5, 8):
                await p.send_wait(stream, AMQPMessage(body=f"a{i}".encode()), publisher_name="pub")
        got = await _consume(stream_port, stream, 8, ConsumerOffsetSpecification(OffsetType.FIRST))
        assert [b for _, b in got] == [f"a{i}".encode() for i in range(8)]
        async with _consumer(stream_port) as c:
            await c.store_offset(stream, "reader", 6)
            for _ in range(100):
                try:
                    if await c.query_offset(stream, "reader") == 6:
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.02)
            assert await c.query_offset(stream, "reader") == 6

    _run(scenario())


def test_amqp_091_publish_read_over_stream(params, stream_port):
    stream = _name("x091")
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    ch.confirm_delivery()
    ch.basic_publish("", stream, b"from-pika", pika.BasicProperties(message_id="mid"))
    conn.close()

    got = _run(_consume(stream_port, stream, 1, ConsumerOffsetSpecification(OffsetType.FIRST)))
    assert got[0] == (0, b"from-pika")
