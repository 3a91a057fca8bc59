"""Microsoft's official Service Bus client and the official CloudEvents SDK's AMQP
binding on the other side of cloudbus (issue 13), in binary and in structured mode.

    python servicebus_client.py send CONNECTION_STRING QUEUE TYPE
        sends two events made by the CloudEvents SDK (cloudevents.core.bindings.amqp:
        one binary, with `cloudEvents_` application properties, one structured) with
        azure-servicebus, and prints each as a JSON line.
    python servicebus_client.py receive CONNECTION_STRING QUEUE COUNT
        receives COUNT messages with azure-servicebus, reads each with the SDK's
        `from_amqp` (which tells the modes apart by content type), completes it, and
        prints each event as a JSON line with the mode it came in.
"""

import json
import sys

from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus._pyamqp.types import TYPE, VALUE, AMQPTypes
from cloudevents.core.bindings.amqp import (
    AMQPMessage,
    from_amqp,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def described(event, mode):
    attributes = event.get_attributes()
    time = attributes.get("time")
    return {
        "mode": mode,
        "id": attributes.get("id"),
        "type": attributes.get("type"),
        "source": attributes.get("source"),
        "subject": attributes.get("subject"),
        "time": time.isoformat() if time is not None else None,
        "tenant": attributes.get("tenant"),
        "priority": attributes.get("priority"),
        "datacontenttype": attributes.get("datacontenttype"),
        "data": event.get_data(),
    }


def amqp_properties(application_properties):
    """The SDK writes `time` as milliseconds in a plain int (its reading of the
    binding's AMQP timestamp), which azure-servicebus cannot encode (it tries an AMQP
    int); it goes as an AMQP timestamp, the type the binding names."""
    out = {}
    for k, v in application_properties.items():
        if k.endswith("time") and isinstance(v, int):
            v = {TYPE: AMQPTypes.timestamp, VALUE: v}
        out[k] = v
    return out


def send(connection, queue, ty):
    events = []
    with ServiceBusClient.from_connection_string(connection) as client:
        with client.get_queue_sender(queue) as sender:
            for n, (mode, encode) in enumerate(
                [("binary", to_binary_event), ("structured", to_structured_event)]
            ):
                event = CloudEvent(
                    {
                        "type": ty,
                        "source": "/python/servicebus",
                        "subject": "orders/{}".format(n),
                        "datacontenttype": "application/json",
                        "tenant": "acme",
                        "priority": 7,
                    },
                    {"n": n, "from": "python"},
                )
                message = encode(event)
                sender.send_messages(
                    ServiceBusMessage(
                        body=message.application_data,
                        application_properties=amqp_properties(message.application_properties) or None,
                        content_type=message.properties.get("content-type"),
                        message_id=event.get_id(),
                    )
                )
                events.append(described(event, mode))
    for e in events:
        print(json.dumps(e, default=str))


def receive(connection, queue, count):
    out = []
    with ServiceBusClient.from_connection_string(connection) as client:
        with client.get_queue_receiver(queue, max_wait_time=10) as receiver:
            while len(out) < count:
                batch = receiver.receive_messages(max_message_count=count - len(out), max_wait_time=10)
                if not batch:
                    break
                for m in batch:
                    message = AMQPMessage(
                        properties={"content-type": text(m.content_type)} if m.content_type else {},
                        application_properties={
                            text(k): text(v) for k, v in (m.application_properties or {}).items()
                        },
                        application_data=b"".join(m.body),
                    )
                    mode = "structured" if (m.content_type or "").startswith(
                        "application/cloudevents") else "binary"
                    event = from_amqp(message, JSONFormat(), CloudEvent)
                    receiver.complete_message(m)
                    out.append(described(event, mode))
    for e in out:
        print(json.dumps(e, default=str))


if __name__ == "__main__":
    command, connection, queue, arg = sys.argv[1:5]
    if command == "send":
        send(connection, queue, arg)
    else:
        receive(connection, queue, int(arg))
