"""The Python baseline for backfill's Kafka replay throughput.

Sends N messages shaped like backfill's replays (a key per message, a
~200-byte value, the 7 backfill.* headers) with confluent-kafka's producer,
the way a careful Python replay script would: produce() without waiting,
poll() for delivery reports, back off on a full local queue, flush() at the
end, and count every delivery report. Idempotence is on, as in backfill, so
both sides pay for the same guarantees. Prints one JSON object with the rate.

Install: pip install confluent-kafka   (scripts/install-tools.sh does it)

usage: python3 bench/kafka_producer.py BOOTSTRAP TOPIC [MESSAGES] [KEYS] [VALUE_BYTES]
  e.g. python3 bench/kafka_producer.py 127.0.0.1:19092 bench-python 1000000
"""

import json
import sys
import time

from confluent_kafka import Producer, libversion, version


def main() -> None:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    bootstrap, topic = sys.argv[1], sys.argv[2]
    messages = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
    keys = int(sys.argv[4]) if len(sys.argv) > 4 else 10_000
    value_bytes = int(sys.argv[5]) if len(sys.argv) > 5 else 200

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "message.timeout.ms": 60_000,
        }
    )
    delivered = 0
    failed = 0
    first_error = None

    def on_delivery(err, _msg):
        nonlocal delivered, failed, first_error
        if err is None:
            delivered += 1
        else:
            failed += 1
            if first_error is None:
                first_error = str(err)

    # Built before the clock starts: the benchmark measures producing, not
    # string formatting (the Rust side builds its batches beforehand too).
    filler = b"x" * value_bytes
    run_id = "run-bench"
    detected_at = "2024-05-02T00:00:00Z"
    t0 = time.perf_counter()
    for i in range(messages):
        key = f"key-{i % keys}"
        event_id = f"evt-{i}"
        headers = [
            ("backfill.run_id", run_id),
            ("backfill.reason", "unprocessed"),
            ("backfill.attempt", "1"),
            ("backfill.event_id", event_id),
            ("backfill.key", key),
            ("backfill.seq", str(i // keys)),
            ("backfill.detected_at", detected_at),
        ]
        while True:
            try:
                producer.produce(
                    topic,
                    key=key,
                    value=filler,
                    headers=headers,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room.
                producer.poll(0.01)
        producer.poll(0)
    remaining = producer.flush(120)
    seconds = time.perf_counter() - t0

    v = version()  # a string in some releases, (string, int) in others
    client_version = v[0] if isinstance(v, tuple) else v
    result = {
        "producer": "confluent-kafka-python",
        "client_version": client_version,
        "librdkafka": libversion()[0],
        "topic": topic,
        "messages": messages,
        "delivered": delivered,
        "failed": failed + remaining,
        "seconds": round(seconds, 3),
        "messages_per_second": round(delivered / seconds, 1) if seconds > 0 else None,
    }
    if first_error is not None:
        result["first_error"] = first_error
    print(json.dumps(result))
    if delivered != messages:
        sys.exit(1)


if __name__ == "__main__":
    main()
