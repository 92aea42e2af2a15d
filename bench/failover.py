"""Failover time of a quorum queue: kill -9 of its leader's node to the first
publisher confirm after it. Run by bench/quorum.sh -f (which starts the
nodes); method in docs/benchmarks.md.

    failover.py QUEUE NODE...   NODE = name,amqp_host,amqp_port,admin_url,pid

Declares QUEUE (x-queue-type quorum) on the first node, finds its leader in
/api/queues, publishes with confirms on another node, one message at a time,
until 200 are confirmed, kills the leader's process (SIGKILL), then goes on
publishing on the same connection (a nack or an error is retried) and prints
the seconds from the kill to the next confirm, then the new leader.
"""

import base64
import json
import os
import signal
import sys
import time
import urllib.request

import pika


def api(admin, path):
    req = urllib.request.Request(admin + path)
    token = base64.b64encode(b"guest:guest").decode()
    req.add_header("Authorization", "Basic " + token)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def leader(admin, queue, not_name=None, within=30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            q = api(admin, "/api/queues/%2F/" + queue)
            if q.get("leader") and q["leader"] != not_name:
                return q["leader"]
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no leader for {queue} within {within} s")


def main():
    queue = sys.argv[1]
    nodes = [dict(zip(("name", "host", "port", "admin", "pid"), n.split(","))) for n in sys.argv[2:]]
    first = nodes[0]
    params = lambda n: pika.ConnectionParameters(
        host=n["host"], port=int(n["port"]), credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=0, blocked_connection_timeout=None)
    conn = pika.BlockingConnection(params(first))
    conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    was = leader(first["admin"], queue)
    victim = next(n for n in nodes if n["name"] == was)
    publisher = next(n for n in nodes if n["name"] != was)
    conn = pika.BlockingConnection(params(publisher))
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(200):
        ch.basic_publish("", queue, b"x" * 16, pika.BasicProperties(delivery_mode=2), mandatory=False)
    os.kill(int(victim["pid"]), signal.SIGKILL)
    t0 = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            ch.basic_publish("", queue, b"y" * 16, pika.BasicProperties(delivery_mode=2))
            break
        except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
            time.sleep(0.01)
    t1 = time.monotonic()
    now = leader(publisher["admin"], queue, not_name=was)
    print(f"FAILOVER queue={queue} killed={was} publisher={publisher['name']} "
          f"first_confirm_after={t1 - t0:.3f}s attempts={tries} new_leader={now}")
    conn.close()


if __name__ == "__main__":
    main()
