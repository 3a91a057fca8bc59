"""Google's official Pub/Sub client and the official CloudEvents Python SDK on the
other side of cloudbus (issue 12): what they send must read correctly in cloudbus,
and what cloudbus sends must read correctly in them.

The CloudEvents Pub/Sub binding (cloudevents/spec, pubsub-protocol-binding.md):
binary mode puts each attribute in a `ce-<name>` message attribute and the data
content type in `Content-Type` (attribute names are case-insensitive, 3.1.1);
structured mode puts the whole event in the data with the `application/cloudevents`
content type. The SDK has no Pub/Sub binding, so this does what a Python developer
does: the SDK's event and JSON format, the Google client for the transport.

    python pubsub_clients.py publish PROJECT TOPIC   # prints the sent events, JSON lines
    python pubsub_clients.py pull PROJECT SUBSCRIPTION COUNT   # prints what was read

The emulator is found through PUBSUB_EMULATOR_HOST, as the Google client does.
"""

import json
import sys
import time

from cloudevents.core.bindings.http import (
    HTTPMessage,
    from_binary_event,
    from_structured_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.v1.event import CloudEvent
from google.cloud import pubsub_v1


def summary(event, mode):
    a = event.get_attributes()
    return {
        "mode": mode,
        "id": a["id"],
        "type": a["type"],
        "source": a["source"],
        "subject": a.get("subject"),
        "tenant": a.get("tenant"),
        "datacontenttype": a.get("datacontenttype"),
        "data": event.get_data(),
    }


def publish(project, topic):
    client = pubsub_v1.PublisherClient()
    path = client.topic_path(project, topic)
    sent = []

    def event(n, **extra):
        attributes = {
            "type": "com.example.python.created",
            "source": "/python/publisher",
            "subject": f"orders/{n}",
            "tenant": "acme",
            "datacontenttype": "application/json",
        }
        attributes.update(extra)
        return CloudEvent(attributes, {"n": n, "from": "python"})

    # Binary mode, attribute names as the SDK's HTTP binding writes them
    # (`ce-id`, ..., `content-type`).
    e = event(1)
    m = to_binary_event(e)
    client.publish(path, m.body, **m.headers).result(timeout=30)
    sent.append(summary(e, "binary, content-type"))

    # Binary mode with `Content-Type`, as the binding's table and sdk-go write it.
    e = event(2)
    m = to_binary_event(e)
    attributes = {k: v for k, v in m.headers.items() if k.lower() != "content-type"}
    attributes["Content-Type"] = "application/json"
    client.publish(path, m.body, **attributes).result(timeout=30)
    sent.append(summary(e, "binary, Content-Type"))

    # Structured mode: the whole event in the data.
    e = event(3)
    m = to_structured_event(e)
    client.publish(path, m.body, **m.headers).result(timeout=30)
    sent.append(summary(e, "structured"))

    for s in sent:
        print(json.dumps(s))


def pull(project, subscription, count):
    client = pubsub_v1.SubscriberClient()
    path = client.subscription_path(project, subscription)
    got = []
    deadline = time.time() + 60
    while len(got) < count and time.time() < deadline:
        r = client.pull(request={"subscription": path, "max_messages": count}, timeout=30)
        acks = []
        for received in r.received_messages:
            m = received.message
            attributes = dict(m.attributes)
            message = HTTPMessage(headers=attributes, body=m.data)
            # The binding's rule (3.): structured when `Content-Type` starts with
            # `application/cloudevents`, else binary. (The SDK's HTTP `from_http`
            # guesses binary whenever a `ce-` attribute is present; a structured
            # message MAY carry them too (3.2.3), and cloudbus's do, for filters.)
            content_type = next(
                (v for k, v in attributes.items() if k.lower() == "content-type"), ""
            )
            if content_type.lower().startswith("application/cloudevents"):
                event, mode = from_structured_event(message), "structured"
            else:
                event, mode = from_binary_event(message), "binary"
            s = summary(event, mode)
            s["attributes"] = sorted(attributes)
            got.append(s)
            acks.append(received.ack_id)
        if acks:
            client.acknowledge(request={"subscription": path, "ack_ids": acks})
    for s in got:
        print(json.dumps(s))


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        publish(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "pull":
        pull(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
