"""An Azure Event Grid topic emulator for cloudbus's tests (no Event Grid emulator can
run on the project machines). Standard library only.

What it does, as Event Grid custom topics do:
- Publish: POST /topics/<topic>/api/events?api-version=2018-01-01 with a batch of
  CloudEvents 1.0 (application/cloudevents-batch+json) or a single one
  (application/cloudevents+json). Authentication by `aeg-sas-key` (the topic key) or
  `aeg-sas-token` (r=<resource>&e=<expiry>&s=<HMAC-SHA256 signature>, as
  azure-eventgrid's generate_sas makes it). Errors as the service answers them:
  401 for a missing or wrong key or token, 404 for an unknown topic, 413 over 1 MB,
  400 for a body that is not CloudEvents; `{"error": {"code", "message"}}`.
- Push: each subscription delivers every matching event to its webhook, one event per
  POST (application/cloudevents+json; charset=utf-8, headers aeg-event-type:
  Notification, aeg-subscription-name, aeg-delivery-count). 200-204 is success; 400,
  401, 403 and 413 dead-letter at once; anything else (or no answer) is retried
  after `retryIntervalSeconds` until `maxDeliveryAttempts`, then dead-lettered.
- Validation handshakes when a subscription is created: the CloudEvents webhook
  handshake (OPTIONS with WebHook-Request-Origin: eventgrid.azure.net, answered with
  WebHook-Allowed-Origin) or Event Grid's SubscriptionValidationEvent (answered with
  {"validationResponse": code}); a failed handshake refuses the subscription (400).
- Filters: includedEventTypes, subjectBeginsWith, subjectEndsWith.

Admin API (the part ARM plays in Azure), used by the tests:
  PUT  /admin/topics/<t>                       {"key": "<base64>"} -> {"endpoint", "key"}
  PUT  /admin/topics/<t>/subscriptions/<s>     {"endpoint", "handshake": "cloudevents"|
       "eventgrid", "includedEventTypes", "subjectBeginsWith", "subjectEndsWith",
       "maxDeliveryAttempts", "retryIntervalSeconds"}
  GET  /admin/topics/<t>/subscriptions/<s>/deadletters
  GET  /admin/topics/<t>/subscriptions/<s>/deliveries
  GET  /health

Run: python emulator.py --port 10080 [--topic NAME --key BASE64]; prints "Ready." and
the EVENTGRID_ENDPOINT / EVENTGRID_KEY of the preset topic.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import queue
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import os

VERBOSE = os.environ.get("EVENTGRID_EMULATOR_VERBOSE") == "1"
MAX_REQUEST_BYTES = 1024 * 1024
SUCCESS = range(200, 205)
NO_RETRY = {400, 401, 403, 413}
REQUIRED = ("id", "source", "specversion", "type")


class Subscription:
    def __init__(self, topic, name, spec):
        self.topic = topic
        self.name = name
        self.endpoint = spec["endpoint"]
        self.types = spec.get("includedEventTypes") or None
        self.begins = spec.get("subjectBeginsWith") or ""
        self.ends = spec.get("subjectEndsWith") or ""
        self.max_attempts = int(spec.get("maxDeliveryAttempts", 30))
        self.retry_interval = float(spec.get("retryIntervalSeconds", 1.0))
        self.queue = queue.Queue()
        self.dead_letters = []
        self.deliveries = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.deliver_forever, daemon=True).start()

    def matches(self, event):
        if self.types is not None and event.get("type") not in self.types:
            return False
        subject = event.get("subject") or ""
        return subject.startswith(self.begins) and subject.endswith(self.ends)

    def post(self, event, attempt):
        body = json.dumps(event).encode()
        request = urllib.request.Request(
            self.endpoint,
            data=body,
            method="POST",
            headers={
                "content-type": "application/cloudevents+json; charset=utf-8",
                "aeg-event-type": "Notification",
                "aeg-subscription-name": self.name.upper(),
                "aeg-delivery-count": str(attempt - 1),
                "aeg-data-version": "",
                "aeg-metadata-version": "1",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return None, str(e)

    def deliver_forever(self):
        while not self.closed:
            event, attempt, not_before = self.queue.get()
            wait = not_before - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            status, text = self.post(event, attempt)
            with self.lock:
                self.deliveries.append(
                    {"id": event.get("id"), "attempt": attempt, "status": status}
                )
            if status in SUCCESS:
                continue
            outcome = "Failed" if status is not None else "Unreachable"
            if status in NO_RETRY or attempt >= self.max_attempts:
                reason = (
                    "MaxDeliveryAttemptsExceeded"
                    if status not in NO_RETRY
                    else "DeliveryFailedNonRetriable"
                )
                with self.lock:
                    self.dead_letters.append(
                        {
                            "event": event,
                            "deadLetterReason": reason,
                            "deliveryAttempts": attempt,
                            "lastDeliveryOutcome": outcome,
                            "lastHttpStatusCode": status,
                            "lastDeliveryResponse": text[:1024],
                            "deadLetteredAt": datetime.datetime.now(
                                datetime.timezone.utc
                            ).isoformat(),
                        }
                    )
                continue
            # Retried later in the background, so that one failing event does not
            # hold up the others (Event Grid does not keep order either).
            threading.Timer(
                self.retry_interval, self.queue.put, args=((event, attempt + 1, 0.0),)
            ).start()


class Topic:
    def __init__(self, name, key):
        self.name = name
        self.key = key
        self.subscriptions = {}


class State:
    def __init__(self):
        self.topics = {}
        self.lock = threading.Lock()


def error(code, message):
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def check_sas_token(token, key, endpoint):
    """Verifies an `aeg-sas-token` (r=...&e=...&s=...); returns an error or None."""
    parts = {}
    for part in token.split("&"):
        k, _, v = part.partition("=")
        parts[k] = v
    if not all(k in parts for k in ("r", "e", "s")):
        return "the SAS token lacks r, e or s"
    unsigned = "r={}&e={}".format(parts["r"], parts["e"])
    try:
        expected = base64.b64encode(
            hmac.new(base64.b64decode(key), unsigned.encode("ascii"), hashlib.sha256).digest()
        ).decode()
    except (ValueError, UnicodeEncodeError):
        return "the SAS token cannot be checked"
    if not hmac.compare_digest(expected, urllib.parse.unquote(parts["s"])):
        return "the SAS token signature does not match"
    resource = urllib.parse.unquote(parts["r"]).lower()
    if not resource.startswith(endpoint.lower()):
        return "the SAS token is for another resource"
    expiry_text = urllib.parse.unquote(parts["e"])
    expiry = None
    for fmt in ("%Y-%m-%d %H:%M:%S%z", "%Y-%m-%d %H:%M:%S.%f%z", "%m/%d/%Y %I:%M:%S %p"):
        try:
            expiry = datetime.datetime.strptime(expiry_text, fmt)
            break
        except ValueError:
            continue
    if expiry is None:
        return "the SAS token expiry is unreadable"
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=datetime.timezone.utc)
    if expiry < datetime.datetime.now(datetime.timezone.utc):
        return "the SAS token has expired"
    return None


def handshake(sub_spec, name):
    """Runs the validation handshake a new subscription's endpoint must pass."""
    endpoint = sub_spec["endpoint"]
    kind = sub_spec.get("handshake", "cloudevents")
    try:
        if kind == "cloudevents":
            request = urllib.request.Request(
                endpoint,
                method="OPTIONS",
                headers={
                    "WebHook-Request-Origin": "eventgrid.azure.net",
                    "WebHook-Request-Rate": "120",
                },
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                allowed = response.headers.get("WebHook-Allowed-Origin", "")
                if response.status != 200 or allowed not in ("eventgrid.azure.net", "*"):
                    return "the webhook did not allow eventgrid.azure.net (got {!r})".format(
                        allowed
                    )
            return None
        code = str(uuid.uuid4())
        validation = [
            {
                "id": str(uuid.uuid4()),
                "topic": "/subscriptions/emulator/resourceGroups/emulator/providers/"
                "Microsoft.EventGrid/topics/emulator",
                "subject": "",
                "data": {
                    "validationCode": code,
                    "validationUrl": "https://rp-emulator.eventgrid.azure.net/validate?code="
                    + code,
                },
                "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                "eventTime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "metadataVersion": "1",
                "dataVersion": "2",
            }
        ]
        request = urllib.request.Request(
            endpoint,
            data=json.dumps(validation).encode(),
            method="POST",
            headers={
                "content-type": "application/json",
                "aeg-event-type": "SubscriptionValidation",
                "aeg-subscription-name": name.upper(),
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read() or b"{}")
            if answer.get("validationResponse") != code:
                return "the webhook answered {!r}, not the validation code".format(answer)
        return None
    except urllib.error.HTTPError as e:
        return "the webhook answered the handshake with {}".format(e.code)
    except (OSError, ValueError) as e:
        return "the handshake failed: {}".format(e)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state = None
    base = ""

    def log_message(self, fmt, *args):
        if VERBOSE:
            sys.stderr.write("eventgrid-emulator: " + (fmt % args) + "\n")

    def reply(self, status, body=b"", content_type="application/json"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def path_parts(self):
        parsed = urllib.parse.urlparse(self.path)
        return [p for p in parsed.path.split("/") if p], parsed

    def do_GET(self):
        parts, _ = self.path_parts()
        if parts == ["health"]:
            return self.reply(200, b'{"status": "ok"}')
        if len(parts) == 6 and parts[0] == "admin" and parts[1] == "topics":
            topic = self.state.topics.get(parts[2])
            sub = topic and topic.subscriptions.get(parts[4])
            if not sub:
                return self.reply(404, error("NotFound", "no such subscription"))
            with sub.lock:
                if parts[5] == "deadletters":
                    return self.reply(200, json.dumps(sub.dead_letters).encode())
                if parts[5] == "deliveries":
                    return self.reply(200, json.dumps(sub.deliveries).encode())
        return self.reply(404, error("NotFound", "no such resource"))

    def do_PUT(self):
        parts, _ = self.path_parts()
        try:
            spec = json.loads(self.body() or b"{}")
        except ValueError:
            return self.reply(400, error("BadRequest", "the body is not JSON"))
        if len(parts) == 3 and parts[:2] == ["admin", "topics"]:
            name = parts[2]
            key = spec.get("key") or base64.b64encode(secrets.token_bytes(32)).decode()
            with self.state.lock:
                topic = self.state.topics.setdefault(name, Topic(name, key))
                topic.key = key
            endpoint = "{}/topics/{}/api/events".format(self.base, name)
            return self.reply(200, json.dumps({"endpoint": endpoint, "key": key}).encode())
        if len(parts) == 5 and parts[:2] == ["admin", "topics"] and parts[3] == "subscriptions":
            topic = self.state.topics.get(parts[2])
            if topic is None:
                return self.reply(404, error("NotFound", "no such topic"))
            if "endpoint" not in spec:
                return self.reply(400, error("BadRequest", "a subscription needs an endpoint"))
            failure = handshake(spec, parts[4])
            if failure:
                return self.reply(
                    400, error("BadRequest", "Webhook validation handshake failed: " + failure)
                )
            with self.state.lock:
                old = topic.subscriptions.get(parts[4])
                if old:
                    old.closed = True
                topic.subscriptions[parts[4]] = Subscription(parts[2], parts[4], spec)
            return self.reply(200, json.dumps({"name": parts[4]}).encode())
        return self.reply(404, error("NotFound", "no such resource"))

    def do_POST(self):
        parts, parsed = self.path_parts()
        if not (len(parts) == 4 and parts[0] == "topics" and parts[2:] == ["api", "events"]):
            return self.reply(404, error("NotFound", "no such resource"))
        topic = self.state.topics.get(parts[1])
        if topic is None:
            self.body()
            return self.reply(404, error("NotFound", "topic {} does not exist".format(parts[1])))
        endpoint = "{}/topics/{}/api/events".format(self.base, parts[1])
        key = self.headers.get("aeg-sas-key")
        token = self.headers.get("aeg-sas-token")
        length = int(self.headers.get("content-length") or 0)
        if key is not None:
            if not hmac.compare_digest(key, topic.key):
                self.rfile.read(length)
                return self.reply(401, error("Unauthorized", "the aeg-sas-key is not the topic's key"))
        elif token is not None:
            failure = check_sas_token(token, topic.key, endpoint)
            if failure:
                self.rfile.read(length)
                return self.reply(401, error("Unauthorized", failure))
        else:
            self.rfile.read(length)
            return self.reply(401, error("Unauthorized", "no aeg-sas-key or aeg-sas-token"))
        if length > MAX_REQUEST_BYTES:
            self.rfile.read(length)
            return self.reply(
                413, error("RequestEntityTooLarge", "the request is over 1 MB")
            )
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except ValueError:
            return self.reply(400, error("BadRequest", "the body is not JSON"))
        content_type = (self.headers.get("content-type") or "").lower()
        events = payload if isinstance(payload, list) else [payload]
        if isinstance(payload, dict) and "batch" in content_type:
            return self.reply(400, error("BadRequest", "a batch must be a JSON array"))
        for i, event in enumerate(events):
            if not isinstance(event, dict):
                return self.reply(400, error("BadRequest", "event {} is not an object".format(i)))
            missing = [k for k in REQUIRED if not event.get(k)]
            if missing:
                return self.reply(
                    400,
                    error(
                        "BadRequest",
                        "event {} lacks required CloudEvents attributes {}".format(i, missing),
                    ),
                )
            if event.get("specversion") != "1.0":
                return self.reply(400, error("BadRequest", "specversion must be 1.0"))
        with self.state.lock:
            subs = list(topic.subscriptions.values())
        for event in events:
            for sub in subs:
                if sub.matches(event):
                    sub.queue.put((event, 1, 0.0))
        return self.reply(200, b"")

    def do_OPTIONS(self):
        return self.reply(405, error("MethodNotAllowed", "OPTIONS"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10080)
    parser.add_argument("--topic", default="cloudbus")
    parser.add_argument("--key", default=None)
    args = parser.parse_args()
    state = State()
    key = args.key or base64.b64encode(secrets.token_bytes(32)).decode()
    state.topics[args.topic] = Topic(args.topic, key)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    Handler.state = state
    Handler.base = "http://{}:{}".format(args.host, server.server_address[1])
    print("EVENTGRID_ENDPOINT={}/topics/{}/api/events".format(Handler.base, args.topic))
    print("EVENTGRID_KEY={}".format(key))
    print("Ready.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
