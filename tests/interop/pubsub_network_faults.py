"""The Pub/Sub network-fault run without cloudbus: Google's official Python client
(google-cloud-pubsub) reads N messages through a TCP proxy that severs every open
connection every 300-700 ms, as cloudbus_conformance::network does for cloudbus
(issue 12). Prints `PYFAULT received=... of N`. With NO_SEVER=1 the proxy only
forwards (the control run).

On the Pub/Sub emulator (2026-11-30) it loses the same way cloudbus does: 1,400,
1,900 and 1,800 of 3,000 received, the rest never within 30 s of calm; the control run
received 3,000 of 3,000 in 2 s. So `pubsub_network_faults_lose_nothing_of_10000` (ignored)
fails on the emulator, not in cloudbus.

    eval "$(bash scripts/pubsub-emulator.sh)"; export PUBSUB_EMULATOR_HOST
    $(bash scripts/gcp-venv.sh) tests/interop/pubsub_network_faults.py 3000
"""
import asyncio
import os
import random
import sys
import threading
import time
import uuid

from google.cloud import pubsub_v1

EMULATOR = os.environ.get("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
PROJECT = "cloudbus-test"


class SeveringProxy:
    """Forwards 127.0.0.1:<port> to the emulator; severs every open connection every
    300-700 ms until `calm` is set (unless NO_SEVER is set)."""

    def __init__(self):
        self.port = None
        self.calm = threading.Event()
        self.open = set()
        self.severs = 0
        threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True).start()
        while self.port is None:
            time.sleep(0.05)

    async def _main(self):
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        while not self.calm.is_set():
            await asyncio.sleep(random.uniform(0.3, 0.7))
            if os.environ.get("NO_SEVER"):
                continue
            for writers in list(self.open):
                for w in writers:
                    w.transport.abort()
            self.severs += 1
        await asyncio.sleep(3600)

    async def _handle(self, client_r, client_w):
        host, port = EMULATOR.rsplit(":", 1)
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        writers = (client_w, up_w)
        self.open.add(writers)
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))
        self.open.discard(writers)


async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


def main(count):
    os.environ["PUBSUB_EMULATOR_HOST"] = EMULATOR
    publisher, admin = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    name = "pyfault-" + uuid.uuid4().hex[:8]
    topic, sub = publisher.topic_path(PROJECT, name), admin.subscription_path(PROJECT, name)
    publisher.create_topic(name=topic)
    admin.create_subscription(request={"name": sub, "topic": topic, "ack_deadline_seconds": 10})
    for f in [publisher.publish(topic, b"x", n=str(i)) for i in range(count)]:
        f.result()

    proxy = SeveringProxy()
    os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{proxy.port}"
    seen, lock = {}, threading.Lock()

    def on_message(m):
        with lock:
            seen[m.attributes["n"]] = seen.get(m.attributes["n"], 0) + 1
        m.ack()

    flow = pubsub_v1.types.FlowControl(max_messages=1000)
    pubsub_v1.SubscriberClient().subscribe(sub, on_message, flow_control=flow)
    # As cloudbus's run: 30 s without progress calms the network, 30 s more ends it.
    start, last, last_progress = time.time(), 0, time.time()
    while True:
        time.sleep(1)
        with lock:
            received = len(seen)
        if received >= count:
            break
        if received > last:
            last, last_progress = received, time.time()
        elif time.time() - last_progress > 30:
            if proxy.calm.is_set():
                break
            proxy.calm.set()
            last_progress = time.time()
    with lock:
        received, duplicates = len(seen), sum(n - 1 for n in seen.values())
    print(f"PYFAULT received={received} of {count} duplicates={duplicates} "
          f"severs={proxy.severs} in {time.time() - start:.0f}s", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
