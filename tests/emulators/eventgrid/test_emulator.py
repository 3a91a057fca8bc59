"""Proves the Event Grid emulator against Microsoft's official Python client
(azure-eventgrid) before the Rust tests rely on it: publishing with a key and with a
SAS token, the errors the service gives, both validation handshakes, push delivery,
filters, retries and dead-lettering.

Run: python -m unittest tests/emulators/eventgrid/test_emulator.py (scripts/test.sh
does, in the venv scripts/azure-emulators.sh makes).
"""

import base64
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import unittest
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from azure.core.credentials import AzureKeyCredential, AzureSasCredential
from azure.core.exceptions import HttpResponseError
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridPublisherClient, generate_sas

HERE = os.path.dirname(os.path.abspath(__file__))


class Webhook:
    """A webhook that answers the handshakes and records what it is sent."""

    def __init__(self, statuses=None, allow_origin=True):
        self.events = []
        self.attempts = []
        self.statuses = list(statuses or [])
        self.allow_origin = allow_origin
        hook = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_OPTIONS(self):
                if hook.allow_origin and self.headers.get("WebHook-Request-Origin"):
                    self.send(200, headers=[("WebHook-Allowed-Origin", "eventgrid.azure.net")])
                else:
                    self.send(403)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.headers.get("aeg-event-type") == "SubscriptionValidation":
                    code = body[0]["data"]["validationCode"]
                    return self.send(200, json.dumps({"validationResponse": code}).encode())
                hook.attempts.append(int(self.headers.get("aeg-delivery-count", "0")) + 1)
                status = hook.statuses.pop(0) if hook.statuses else 200
                if status == 200:
                    hook.events.append(body)
                self.send(status)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:{}/events".format(self.server.server_address[1])

    def close(self):
        self.server.shutdown()


def wait(predicate, seconds=10):
    until = time.time() + seconds
    while time.time() < until:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class EventGridEmulatorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.key = base64.b64encode(b"k" * 32).decode()
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "emulator.py"), "--port", "0",
             "--topic", "proof", "--key", cls.key],
            stdout=subprocess.PIPE, text=True,
        )
        env = {}
        for line in cls.proc.stdout:
            if line.strip() == "Ready.":
                break
            k, _, v = line.strip().partition("=")
            env[k] = v
        cls.endpoint = env["EVENTGRID_ENDPOINT"]
        cls.admin = cls.endpoint.split("/topics/")[0] + "/admin/topics/proof"

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(5)

    def admin_put(self, path, body):
        request = urllib.request.Request(
            self.admin + path, data=json.dumps(body).encode(), method="PUT",
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def admin_get(self, path):
        with urllib.request.urlopen(self.admin + path) as r:
            return json.loads(r.read())

    def subscribe(self, name, hook, **spec):
        spec.setdefault("retryIntervalSeconds", 0.05)
        status, body = self.admin_put("/subscriptions/" + name, dict(endpoint=hook.url, **spec))
        self.assertEqual(status, 200, body)

    def client(self):
        return EventGridPublisherClient(self.endpoint, AzureKeyCredential(self.key))

    def test_publish_with_key_is_pushed_to_the_webhook(self):
        hook = Webhook()
        self.subscribe("keyed", hook, handshake="cloudevents")
        event = CloudEvent(source="/proof", type="proof.created", data={"n": 1}, subject="s/1",
                           extensions={"tenant": "acme"})
        self.client().send([event])
        self.assertTrue(wait(lambda: hook.events))
        got = hook.events[0]
        self.assertEqual(got["id"], event.id)
        self.assertEqual(got["type"], "proof.created")
        self.assertEqual(got["source"], "/proof")
        self.assertEqual(got["subject"], "s/1")
        self.assertEqual(got["tenant"], "acme")
        self.assertEqual(got["data"], {"n": 1})
        hook.close()

    def test_sas_token_is_accepted_and_checked(self):
        hook = Webhook()
        self.subscribe("sas", hook)
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        token = generate_sas(self.endpoint, self.key, expiry)
        client = EventGridPublisherClient(self.endpoint, AzureSasCredential(token))
        client.send([CloudEvent(source="/proof", type="proof.sas", data=None)])
        self.assertTrue(wait(lambda: hook.events))
        expired = generate_sas(
            self.endpoint, self.key, datetime.datetime.now(datetime.timezone.utc)
            - datetime.timedelta(minutes=1))
        with self.assertRaises(HttpResponseError) as e:
            EventGridPublisherClient(self.endpoint, AzureSasCredential(expired)).send(
                [CloudEvent(source="/proof", type="proof.sas", data=None)])
        self.assertEqual(e.exception.status_code, 401)
        forged = generate_sas(self.endpoint, base64.b64encode(b"x" * 32).decode(), expiry)
        with self.assertRaises(HttpResponseError) as e:
            EventGridPublisherClient(self.endpoint, AzureSasCredential(forged)).send(
                [CloudEvent(source="/proof", type="proof.sas", data=None)])
        self.assertEqual(e.exception.status_code, 401)
        hook.close()

    def test_wrong_key_is_401_and_oversize_is_413(self):
        bad = EventGridPublisherClient(self.endpoint, AzureKeyCredential("d3Jvbmc="))
        with self.assertRaises(HttpResponseError) as e:
            bad.send([CloudEvent(source="/proof", type="proof.bad", data=None)])
        self.assertEqual(e.exception.status_code, 401)
        with self.assertRaises(HttpResponseError) as e:
            self.client().send(
                [CloudEvent(source="/proof", type="proof.big", data="x" * (1100 * 1024))])
        self.assertEqual(e.exception.status_code, 413)

    def test_handshakes(self):
        refusing = Webhook(allow_origin=False)
        status, body = self.admin_put(
            "/subscriptions/refused", {"endpoint": refusing.url, "handshake": "cloudevents"})
        self.assertEqual(status, 400)
        self.assertIn("handshake", body["error"]["message"])
        hook = Webhook(allow_origin=False)
        # The Event Grid schema handshake does not need OPTIONS.
        self.subscribe("validated", hook, handshake="eventgrid")
        self.client().send([CloudEvent(source="/proof", type="proof.validated", data=None)])
        self.assertTrue(wait(lambda: hook.events))
        refusing.close()
        hook.close()

    def test_filters(self):
        hook = Webhook()
        self.subscribe("filtered", hook, includedEventTypes=["proof.wanted"],
                       subjectBeginsWith="orders/")
        self.client().send([
            CloudEvent(source="/proof", type="proof.wanted", data=None, subject="orders/1"),
            CloudEvent(source="/proof", type="proof.other", data=None, subject="orders/2"),
            CloudEvent(source="/proof", type="proof.wanted", data=None, subject="users/3"),
        ])
        self.assertTrue(wait(lambda: hook.events))
        time.sleep(0.3)
        self.assertEqual([e["subject"] for e in hook.events], ["orders/1"])
        hook.close()

    def test_retries_then_dead_letters(self):
        flaky = Webhook(statuses=[503, 500])
        self.subscribe("flaky", flaky, maxDeliveryAttempts=5)
        self.client().send([CloudEvent(source="/proof", type="proof.flaky", data=None)])
        self.assertTrue(wait(lambda: flaky.events))
        self.assertEqual(flaky.attempts, [1, 2, 3])
        rejecting = Webhook(statuses=[400])
        self.subscribe("rejecting", rejecting, maxDeliveryAttempts=5)
        failing = Webhook(statuses=[500] * 10)
        self.subscribe("failing", failing, maxDeliveryAttempts=3)
        event = CloudEvent(source="/proof", type="proof.poison", data=None)
        self.client().send([event])
        self.assertTrue(wait(lambda: self.admin_get("/subscriptions/rejecting/deadletters")))
        letter = self.admin_get("/subscriptions/rejecting/deadletters")[0]
        self.assertEqual(letter["event"]["id"], event.id)
        self.assertEqual(letter["deliveryAttempts"], 1)
        self.assertEqual(letter["lastHttpStatusCode"], 400)
        self.assertTrue(wait(lambda: self.admin_get("/subscriptions/failing/deadletters")))
        letter = self.admin_get("/subscriptions/failing/deadletters")[0]
        self.assertEqual(letter["deadLetterReason"], "MaxDeliveryAttemptsExceeded")
        self.assertEqual(letter["deliveryAttempts"], 3)
        self.assertEqual(failing.attempts, [1, 2, 3])
        for h in (flaky, rejecting, failing):
            h.close()


if __name__ == "__main__":
    unittest.main()
