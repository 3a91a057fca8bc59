"""Microsoft's official Event Grid client on the sending side of cloudbus (issue 12):
it publishes CloudEvents to an Event Grid topic (the project's emulator), which pushes
them to a cloudbus push endpoint; cloudbus must read each as it was sent.

    python eventgrid_client.py ENDPOINT KEY TYPE   # prints the sent events, JSON lines

Three events: JSON data, binary data (`data_base64` on the wire) and text data.
"""

import base64
import json
import sys

from azure.core.credentials import AzureKeyCredential
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridPublisherClient


def main(endpoint, key, ty):
    events = [
        CloudEvent(source="/python/eventgrid", type=ty, subject="orders/1",
                   data={"n": 1, "from": "python"}, extensions={"tenant": "acme"}),
        CloudEvent(source="/python/eventgrid", type=ty, subject="orders/2",
                   data=b"\x00\x01binary\xff", datacontenttype="application/octet-stream",
                   extensions={"tenant": "acme"}),
        CloudEvent(source="/python/eventgrid", type=ty, subject="orders/3",
                   data="plain text", datacontenttype="text/plain",
                   extensions={"tenant": "acme"}),
    ]
    EventGridPublisherClient(endpoint, AzureKeyCredential(key)).send(events)
    for e in events:
        data = e.data
        print(json.dumps({
            "id": e.id,
            "type": e.type,
            "source": e.source,
            "subject": e.subject,
            "tenant": e.extensions.get("tenant"),
            "datacontenttype": e.datacontenttype,
            "data_base64": base64.b64encode(data).decode() if isinstance(data, bytes) else None,
            "data": None if isinstance(data, bytes) else data,
        }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
