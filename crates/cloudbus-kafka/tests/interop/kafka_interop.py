"""Confluent's Kafka client (confluent-kafka, librdkafka) and the official CloudEvents
Python SDK's Kafka binding on the other side of cloudbus, in binary and in structured
mode. Run with the python of scripts/kafka-venv.sh (CLOUDBUS_KAFKA_PYTHON).

    python kafka_interop.py produce BOOTSTRAP TOPIC MODE N
        produces N events made by the CloudEvents SDK (type com.example.interop,
        source /python, id py-<i>, extension partitionkey key-<i % 3>, data
        {"n": i} as application/json), converted with its Kafka binding
        (cloudevents.core.bindings.kafka: to_binary or to_structured, MODE binary or
        structured; the record key is the partitionkey), with a confluent-kafka
        Producer; waits for every delivery report and exits 1 on any error.
    python kafka_interop.py consume BOOTSTRAP TOPIC GROUP N TIMEOUT_S
        consumes N records with confluent-kafka in GROUP (a fresh one: from the
        earliest offset), reads each with the SDK's from_structured when its
        content-type header is application/cloudevents+... and from_binary otherwise,
        and prints each as a JSON line: id, type, source, partitionkey, key (the
        record's, as text, or null), data, mode, headers (name: value as text),
        extensions (every attribute that is not a context attribute of the spec,
        partitionkey included: name: value), and topic, partition, offset,
        specversion, datacontenttype, time. Exits 1 when
        fewer than N arrive within TIMEOUT_S seconds, or when a record is not a
        CloudEvent.
    python kafka_interop.py produce-foreign BOOTSTRAP TOPIC
        produces one record that is not a CloudEvent: no key, no headers, the body
        `not a cloudevent`.

(cloudevents 2.x: the binding is cloudevents.core.bindings.kafka; the 1.x API,
cloudevents.kafka, is cloudevents.v1.kafka there.)
"""

import base64
import json
import sys
import time

from cloudevents.core.bindings.kafka import (
    KafkaMessage,
    from_binary,
    from_structured,
    to_binary,
    to_structured,
)
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Consumer, KafkaError, Producer

# librdkafka's default session timeout (45 s) makes tansu hold the first JoinGroup of
# a group for about half of it (23 s); 6 s (Kafka's smallest by default) makes it 3 s.
SESSION_TIMEOUT_MS = 6000

# The context attributes of CloudEvents 1.0 (required and optional); every other
# attribute of an event is an extension.
CONTEXT_ATTRIBUTES = frozenset(
    ("id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time")
)


def text(value):
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def delivered_all(producer, reports, expected, timeout=30):
    left = producer.flush(timeout)
    errors = [r for r in reports if r is not None]
    if left or errors or len(reports) != expected:
        print(
            "delivery failed: {} not flushed, {} reports of {}, errors: {}".format(
                left, len(reports), expected, errors),
            file=sys.stderr,
        )
        sys.exit(1)


def produce(bootstrap, topic, mode, n):
    if mode not in ("binary", "structured"):
        print("MODE is binary or structured, not {!r}".format(mode), file=sys.stderr)
        sys.exit(2)
    encode = to_binary if mode == "binary" else to_structured
    producer = Producer({"bootstrap.servers": bootstrap})
    reports = []
    for i in range(n):
        event = CloudEvent(
            {
                "type": "com.example.interop",
                "source": "/python",
                "id": "py-{}".format(i),
                "datacontenttype": "application/json",
                "partitionkey": "key-{}".format(i % 3),
            },
            {"n": i},
        )
        message = encode(event, JSONFormat())
        producer.produce(
            topic,
            key=message.key,
            value=message.value,
            headers=list(message.headers.items()),
            on_delivery=lambda err, _msg: reports.append(err),
        )
        producer.poll(0)
    delivered_all(producer, reports, n)


def produce_foreign(bootstrap, topic):
    producer = Producer({"bootstrap.servers": bootstrap})
    reports = []
    producer.produce(topic, value=b"not a cloudevent", on_delivery=lambda err, _msg: reports.append(err))
    delivered_all(producer, reports, 1)


def jsonable(data):
    if isinstance(data, (bytes, bytearray)):
        try:
            return json.loads(data)
        except ValueError:
            pass
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(data).decode("ascii")}
    return data


def described(record):
    headers = {}
    for name, value in record.headers() or []:
        headers[name] = text(value)
    content_type = (headers.get("content-type") or "").strip().lower()
    mode = "structured" if content_type.startswith("application/cloudevents") else "binary"
    message = KafkaMessage(
        headers={name: value or b"" for name, value in (record.headers() or [])},
        key=record.key(),
        value=record.value() or b"",
    )
    decode = from_structured if mode == "structured" else from_binary
    event = decode(message, JSONFormat(), CloudEvent)
    attributes = event.get_attributes()
    event_time = attributes.get("time")
    return {
        "id": attributes.get("id"),
        "type": attributes.get("type"),
        "source": attributes.get("source"),
        "partitionkey": attributes.get("partitionkey"),
        "key": text(record.key()),
        "data": jsonable(event.get_data()),
        "mode": mode,
        "headers": headers,
        "extensions": {
            name: value for name, value in attributes.items() if name not in CONTEXT_ATTRIBUTES
        },
        "topic": record.topic(),
        "partition": record.partition(),
        "offset": record.offset(),
        "specversion": attributes.get("specversion"),
        "datacontenttype": attributes.get("datacontenttype"),
        "time": event_time.isoformat() if event_time is not None else None,
    }


def consume(bootstrap, topic, group, n, timeout_s):
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            # The topic may not exist yet (cloudbus makes it when it publishes): look
            # again every second, not every 5 minutes, and do not make it here.
            "allow.auto.create.topics": False,
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    consumer.subscribe([topic])
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < n and time.monotonic() < deadline:
            record = consumer.poll(min(1.0, max(0.0, deadline - time.monotonic())))
            if record is None:
                continue
            if record.error():
                # Unknown topic (not created yet), end of partition: wait on.
                if record.error().fatal():
                    print("consumer error: {}".format(record.error()), file=sys.stderr)
                    sys.exit(1)
                continue
            try:
                line = described(record)
            except Exception as e:  # not a CloudEvent in either mode
                print(
                    "record {}[{}]@{} is not a CloudEvent ({}: {}); headers {}, value {!r}".format(
                        record.topic(), record.partition(), record.offset(), type(e).__name__, e,
                        record.headers(), record.value()),
                    file=sys.stderr,
                )
                sys.exit(1)
            print(json.dumps(line, default=str), flush=True)
            seen += 1
    finally:
        consumer.close()
    if seen < n:
        print("{} of {} records in {} s".format(seen, n, timeout_s), file=sys.stderr)
        sys.exit(1)


def main(argv):
    usage = (
        "usage: kafka_interop.py produce BOOTSTRAP TOPIC MODE N\n"
        "       kafka_interop.py consume BOOTSTRAP TOPIC GROUP N TIMEOUT_S\n"
        "       kafka_interop.py produce-foreign BOOTSTRAP TOPIC"
    )
    if len(argv) == 5 and argv[0] == "produce":
        produce(argv[1], argv[2], argv[3], int(argv[4]))
    elif len(argv) == 6 and argv[0] == "consume":
        consume(argv[1], argv[2], argv[3], int(argv[4]), float(argv[5]))
    elif len(argv) == 3 and argv[0] == "produce-foreign":
        produce_foreign(argv[1], argv[2])
    else:
        print(usage, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
