"""The Stream protocol with the Python `rstream` client (skipped when it is not
installed): create/delete, publish with confirms, consume from an offset
specification, server-side offsets, publisher deduplication, a stream
written over AMQP 0-9-1 (pika) read over the stream protocol, sub-entry
batches (uncompressed and gzip) read by both protocols, and single active
consumers spread over a super stream's partitions."""
import asyncio
import uuid

import pika
import pytest

rstream = pytest.importorskip("rstream")
from rstream import (  # noqa: E402
    AMQPMessage,
    CompressionType,
    Consumer,
    ConsumerOffsetSpecification,
    OffsetSpecification,
    OffsetType,
    Producer,
    SuperStreamConsumer,
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


def test_sub_entry_batches_none_and_gzip(params, stream_port):
    """A sub-entry batch is one publishing id (confirmed once, deduplicated
    whole); every record gets its own offset, over both protocols."""
    stream = _name("subentry")
    batches = [
        (CompressionType.No, [f"n{i}" for i in range(3)]),
        (CompressionType.Gzip, [f"g{i}" for i in range(4)]),
        (CompressionType.No, ["x"]),
    ]
    want = [b for _, bodies in batches for b in bodies]

    async def scenario():
        confirmed = []
        done = asyncio.Event()

        def on_confirm(status):
            confirmed.append((status.message_id, status.is_confirmed))
            if len(confirmed) == len(batches):
                done.set()

        async with _producer(stream_port) as p:
            await p.create_stream(stream)
            for compression, bodies in batches:
                await p.send_sub_entry(
                    stream,
                    [AMQPMessage(body=b.encode()) for b in bodies],
                    compression_type=compression,
                    publisher_name="batcher",
                    on_publish_confirm=on_confirm,
                )
            await asyncio.wait_for(done.wait(), 10)
        # One confirm per batch, by its one publishing id (rstream numbers
        # its messages and gives a batch the id of its last one).
        assert [ok for _, ok in confirmed] == [True] * len(batches)
        ids = sorted(i for i, _ in confirmed)
        assert len(set(ids)) == len(batches)
        got = await _consume(stream_port, stream, len(want), ConsumerOffsetSpecification(OffsetType.FIRST))
        assert [b for _, b in got] == [w.encode() for w in want]
        assert [o for o, _ in got] == list(range(len(want)))

    _run(scenario())

    # AMQP 0-9-1: each record is its own delivery, at its own offset.
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    got = []
    for method, props, body in ch.consume(stream, arguments={"x-stream-offset": "first"}, inactivity_timeout=5):
        assert method is not None, f"only {got} delivered"
        got.append((props.headers["x-stream-offset"], body.decode()))
        ch.basic_ack(method.delivery_tag)
        if len(got) == len(want):
            break
    ch.cancel()
    conn.close()
    assert got == list(enumerate(want))


def test_super_stream_single_active_consumers_spread_and_rebalance(stream_port):
    """Two consumers of one group on a 3-partition super stream: the second
    takes partition 1 (1 % 2), and everything when the first leaves."""
    ss = _name("sac")
    parts = [f"{ss}-{i}" for i in range(3)]
    props = {"single-active-consumer": "true", "name": "group", "super-stream": ss}

    def ssc():
        return SuperStreamConsumer("127.0.0.1", stream_port, username="guest", password="guest", super_stream=ss)

    async def first(is_active, ctx):
        return OffsetSpecification(OffsetType.FIRST, 0)

    async def wait_for(got, n):
        for _ in range(500):
            if len(got) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {got}")

    async def scenario():
        a_got, b_got = [], []
        async with _producer(stream_port) as p:
            a = ssc()
            await a.start()
            await a.create_super_stream(ss, n_partitions=3)

            async def send(round_):
                for i, part in enumerate(parts):
                    await p.send_wait(part, AMQPMessage(body=f"{round_}:{i}".encode()))

            await send(0)
            await a.subscribe(
                lambda m, ctx: a_got.append((ctx.stream, bytes(m.body))),
                decoder=amqp_decoder,
                properties=dict(props),
                consumer_update_listener=first,
            )
            await wait_for(a_got, 3)
            assert sorted(a_got) == [(parts[i], f"0:{i}".encode()) for i in range(3)]
            b = ssc()
            await b.start()
            await b.subscribe(
                lambda m, ctx: b_got.append((ctx.stream, bytes(m.body))),
                decoder=amqp_decoder,
                properties=dict(props),
                consumer_update_listener=first,
            )
            await wait_for(b_got, 1)
            assert b_got == [(parts[1], b"0:1")]
            await send(1)
            await wait_for(a_got, 5)
            await wait_for(b_got, 2)
            await asyncio.sleep(0.3)
            assert sorted(a_got[3:]) == [(parts[0], b"1:0"), (parts[2], b"1:2")]
            assert b_got[1:] == [(parts[1], b"1:1")]
            await a.close()
            await wait_for(b_got, 6)
            assert sorted(b_got[2:]) == [
                (parts[0], b"0:0"),
                (parts[0], b"1:0"),
                (parts[2], b"0:2"),
                (parts[2], b"1:2"),
            ]
            await b.close()

    _run(scenario())
