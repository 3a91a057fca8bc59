"""Proves the Service Bus emulator against Microsoft's official Python client
(azure-servicebus, whose AMQP stack is its own pure-Python one) before the Rust tests
rely on it: send and receive with every property, batches, peek-lock settlement
(complete, abandon, dead-letter, defer), the delivery count and MaxDeliveryCount,
the dead-letter sub-queue, lock renewal and expiry, peek, scheduled messages,
duplicate detection, topic rules (SQL and correlation), sessions,
receive-and-delete, the ATOM management API through ServiceBusAdministrationClient,
and a wrong key refused on both.

Run: python -m unittest tests/emulators/servicebus/test_emulator.py (scripts/test.sh
does, in the venv scripts/azure-venv.sh makes).
"""

import base64
import datetime
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import unittest
import uuid

from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.servicebus.management import (
    CorrelationRuleFilter,
    ServiceBusAdministrationClient,
    SqlRuleFilter,
)
from azure.servicebus.exceptions import ServiceBusAuthenticationError, SessionLockLostError
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)

HERE = os.path.dirname(os.path.abspath(__file__))


class EmulatorTokenCredential:
    """A token credential as azure-identity's are (get_token(*scopes)), issuing what
    the emulator trusts in Entra ID's place: HS256 JWTs signed with its token key."""

    def __init__(self, key="cloudbus-emulator-token-key", audience="https://servicebus.azure.net"):
        self.key, self.audience, self.scopes = key, audience, []

    def get_token(self, *scopes, **kwargs):
        self.scopes.extend(scopes)
        expires = int(time.time()) + 3600

        def part(value):
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        signed = part({"alg": "HS256", "typ": "JWT"}) + "." + part({"aud": self.audience, "exp": expires})
        signature = hmac.new(self.key.encode(), signed.encode(), hashlib.sha256).digest()
        token = signed + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        return AccessToken(token, expires)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SessionLockExpiryTest(unittest.TestCase):
    """The emulator's own bookkeeping, where a race between its timer and a client is
    too narrow to hit through a client every time."""

    class Broker:
        seq = 0

        def next_seq(self):
            self.seq += 1
            return self.seq

        def pump(self, entity):
            pass

    def test_a_lapsed_session_lock_is_lost_by_its_link_even_when_another_accept_comes_first(self):
        """A session whose lock ran out while a receive for the next available session
        arrived before the timer: the link holding it must still be detached with
        session-lock-lost (and its messages given back once). Before, the accept
        forgot the owner, its link stayed attached with the session, and the message
        was given back by its own lock and delivered to that link again with the lapsed
        lock: lost twice, it came back as attempt 3 (CI's
        servicebus_session_queue::unacked_is_redelivered_after_lease)."""
        sys.path.insert(0, HERE)
        import emulator

        entity = emulator.Entity("q", {"RequiresSession": True, "LockDuration": "PT5S"}, self.Broker())
        held, other = object(), object()
        entity.consumers.extend([held, other])
        entity.session_owners["S"] = held
        entity.session_locked_until["S"] = emulator.now_ms() - 1
        self.assertIsNone(entity.lock_session(None, other))
        self.assertEqual(entity.expired_session_links(), [("S", held)])


class TestFaultTest(unittest.TestCase):
    """The faults a message can ask the emulator for (cloudbus's tests of malformed
    deliveries, issue 28 item 22), on the bytes the emulator would send."""

    def stored(self, fault):
        sys.path.insert(0, HERE)
        import emulator
        from proton import Message

        entity = emulator.Entity("q", {"LockDuration": "PT5S"}, SessionLockExpiryTest.Broker())
        stored = emulator.Stored(
            Message(body=b"x", properties={"cloudEvents_emulatorfault": fault} if fault else None), 1
        )
        entity.lock(stored, None)
        return emulator, entity, stored

    def test_a_plain_message_decodes_with_its_lock_token(self):
        emulator, entity, stored = self.stored(None)
        tag, wire = emulator.delivery_of(stored, entity, True)
        self.assertEqual(tag, stored.lock_token.bytes_le)
        from proton import Message

        decoded = Message()
        decoded.decode(wire)
        self.assertEqual(decoded.annotations[emulator.symbol("x-opt-lock-token")], stored.lock_token)

    def test_undecodable_bytes_are_the_header_then_a_bad_section(self):
        """The header section as always (so a decoder gets past it), then a data
        section whose value has no valid AMQP constructor. (Proton's decoder stops
        quietly at what it cannot read; fe2o3's fails, which the Rust test of this
        fault proves.)"""
        emulator, entity, stored = self.stored("undecodable")
        tag, wire = emulator.delivery_of(stored, entity, True)
        self.assertEqual(tag, stored.lock_token.bytes_le)
        plain = emulator.encode_with_header(emulator.encode_message(stored, entity))
        header = plain[: 5 + plain[4]]
        self.assertTrue(header.startswith(b"\x00\x53\x70\xc0"))
        self.assertEqual(wire, header + emulator.UNDECODABLE_SECTION)
        # 0xee: none of AMQP 1.0's format codes (types.xml, section 1.6).
        self.assertEqual(emulator.UNDECODABLE_SECTION[-1], 0xEE)

    def test_no_lock_token_has_a_short_tag_and_no_annotation(self):
        emulator, entity, stored = self.stored("no-lock-token")
        tag, wire = emulator.delivery_of(stored, entity, True)
        self.assertEqual(len(tag), 8)
        from proton import Message

        decoded = Message()
        decoded.decode(wire)
        self.assertNotIn(emulator.symbol("x-opt-lock-token"), decoded.annotations)
        self.assertIn(emulator.symbol("x-opt-locked-until"), decoded.annotations)


class ServiceBusEmulatorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        port = free_port()
        cls.proc = subprocess.Popen(
            # The management API on any free port: port + 1 may be taken.
            [sys.executable, os.path.join(HERE, "emulator.py"), "--port", str(port),
             "--management-port", "0", "--config", os.path.join(HERE, "config.json")],
            stdout=subprocess.PIPE, text=True,
        )
        for line in cls.proc.stdout:
            if line.startswith("SERVICEBUS_CONNECTION_STRING="):
                cls.conn = line.strip().split("=", 1)[1]
            if line.startswith("SERVICEBUS_MANAGEMENT_ENDPOINT="):
                cls.management = line.strip().split("=", 1)[1]
            if line.strip() == "Ready.":
                break
        cls.client = ServiceBusClient.from_connection_string(cls.conn)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.proc.terminate()
        cls.proc.wait(5)

    def drain(self, receiver, count, wait=5):
        got = []
        until = time.time() + wait
        while len(got) < count and time.time() < until:
            got.extend(receiver.receive_messages(max_message_count=count - len(got), max_wait_time=1))
        return got

    def empty(self, queue, sub_queue=None):
        """Removes what an earlier failing test left behind."""
        with self.client.get_queue_receiver(queue, sub_queue=sub_queue,
                                            receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
            while r.peek_messages(max_message_count=50):
                if not r.receive_messages(max_message_count=50, max_wait_time=0.5):
                    break

    def setUp(self):
        for q in ("proof-queue", "proof-dedup"):
            self.empty(q)
            self.empty(q, ServiceBusSubQueue.DEAD_LETTER)

    def test_send_receive_complete_keeps_every_property(self):
        sent = ServiceBusMessage(
            b"\x00\xffbody", message_id="id-1", subject="order", correlation_id="corr",
            content_type="application/octet-stream", reply_to="replies", to="someone",
            application_properties={"tier": "gold", "n": 7, "ok": True},
        )
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(sent)
            batch = s.create_message_batch()
            for i in range(3):
                batch.add_message(ServiceBusMessage("batched-{}".format(i), message_id="b{}".format(i)))
            s.send_messages(batch)
        with self.client.get_queue_receiver("proof-queue") as r:
            got = self.drain(r, 4)
            self.assertEqual(len(got), 4)
            first = got[0]
            self.assertEqual(b"".join(first.body), b"\x00\xffbody")
            self.assertEqual(first.message_id, "id-1")
            self.assertEqual(first.subject, "order")
            self.assertEqual(first.correlation_id, "corr")
            self.assertEqual(first.content_type, "application/octet-stream")
            self.assertEqual(first.reply_to, "replies")
            self.assertEqual(first.application_properties[b"tier"], b"gold")
            self.assertEqual(first.application_properties[b"n"], 7)
            self.assertEqual(first.delivery_count, 0)
            self.assertIsNotNone(first.lock_token)
            self.assertEqual([str(m) for m in got[1:]], ["batched-0", "batched-1", "batched-2"])
            seqs = [m.sequence_number for m in got]
            self.assertEqual(seqs, sorted(seqs))
            for m in got:
                r.complete_message(m)
            self.assertEqual(r.receive_messages(max_wait_time=1), [])

    def test_abandon_counts_and_max_delivery_count_dead_letters(self):
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(ServiceBusMessage("poison", message_id="p"))
        with self.client.get_queue_receiver("proof-queue") as r:
            for attempt in range(3):  # MaxDeliveryCount is 3
                got = self.drain(r, 1)
                self.assertEqual(len(got), 1, "attempt {}".format(attempt))
                self.assertEqual(got[0].delivery_count, attempt)
                r.abandon_message(got[0])
            self.assertEqual(r.receive_messages(max_wait_time=1), [])
        with self.client.get_queue_receiver("proof-queue", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as d:
            letters = self.drain(d, 1)
            self.assertEqual(len(letters), 1)
            self.assertEqual(letters[0].dead_letter_reason, "MaxDeliveryCountExceeded")
            self.assertEqual(letters[0].message_id, "p")
            d.complete_message(letters[0])

    def test_explicit_dead_letter_keeps_reason_and_description(self):
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(ServiceBusMessage("bad", message_id="dl"))
        with self.client.get_queue_receiver("proof-queue") as r:
            got = self.drain(r, 1)
            r.dead_letter_message(got[0], reason="not a cloud event", error_description="details")
        with self.client.get_queue_receiver("proof-queue", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as d:
            letters = self.drain(d, 1)
            self.assertEqual(letters[0].dead_letter_reason, "not a cloud event")
            self.assertEqual(letters[0].dead_letter_error_description, "details")
            self.assertEqual(letters[0].dead_letter_source, "proof-queue")
            d.complete_message(letters[0])

    def test_defer_then_receive_by_sequence_number(self):
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(ServiceBusMessage("later", message_id="def"))
        with self.client.get_queue_receiver("proof-queue") as r:
            got = self.drain(r, 1)
            seq = got[0].sequence_number
            r.defer_message(got[0])
            self.assertEqual(r.receive_messages(max_wait_time=1), [])
            deferred = r.receive_deferred_messages([seq])
            self.assertEqual(len(deferred), 1)
            self.assertEqual(deferred[0].message_id, "def")
            r.complete_message(deferred[0])

    def test_an_abandoned_deferred_message_stays_deferred(self):
        """As the service does: a deferred message taken back by sequence number and
        abandoned goes back among the deferred ones (counted), where no receive sees
        it; only receive-by-sequence-number does (cloudbus sends such a message again
        on a nack, issue 28 item 6)."""
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(ServiceBusMessage("deferred", message_id="ab-def"))
        with self.client.get_queue_receiver("proof-queue") as r:
            got = self.drain(r, 1)
            seq = got[0].sequence_number
            r.defer_message(got[0])
            deferred = r.receive_deferred_messages([seq])
            self.assertEqual(len(deferred), 1)
            count = deferred[0].delivery_count
            r.abandon_message(deferred[0])
            self.assertEqual(r.receive_messages(max_wait_time=1), [])
            again = r.receive_deferred_messages([seq])
            self.assertEqual([m.message_id for m in again], ["ab-def"])
            self.assertGreater(again[0].delivery_count, count)
            r.complete_message(again[0])

    def test_renew_lock_takes_several_lock_tokens(self):
        """One renew-lock request for several messages (cloudbus renews in batches,
        issue 28 item 10), through the client's own array request: each lock is
        renewed, the expirations answered in order."""
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages([ServiceBusMessage(str(i), message_id="rl-{}".format(i)) for i in range(3)])
        with self.client.get_queue_receiver("proof-queue") as r:
            got = self.drain(r, 3)
            self.assertEqual(len(got), 3)
            before = [m.locked_until_utc.timestamp() * 1000 for m in got]
            time.sleep(1)
            answer = r._renew_locks(*[m.lock_token for m in got])
            expirations = list(answer[b"expirations"])
            self.assertEqual(len(expirations), 3)
            for was, now in zip(before, expirations):
                self.assertGreater(now, was)
            for m in got:
                r.complete_message(m)

    def test_peek_renew_and_lock_expiry(self):
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages([ServiceBusMessage("a", message_id="pa"), ServiceBusMessage("b", message_id="pb")])
        with self.client.get_queue_receiver("proof-queue") as r:
            peeked = r.peek_messages(max_message_count=5)
            self.assertEqual([m.message_id for m in peeked], ["pa", "pb"])
            got = self.drain(r, 2)
            before = got[0].locked_until_utc
            time.sleep(1)
            after = r.renew_message_lock(got[0])
            self.assertGreater(after, before)
            r.complete_message(got[1])
            # Not settled: the 5 s lock expires, then the message comes back counted.
            time.sleep(6.5)
            back = self.drain(r, 1, wait=5)
            self.assertEqual(len(back), 1)
            self.assertEqual(back[0].message_id, "pa")
            self.assertEqual(back[0].delivery_count, 1)
            r.complete_message(back[0])

    def test_scheduled_messages_and_cancel(self):
        at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=4)
        with self.client.get_queue_sender("proof-queue") as s:
            seqs = s.schedule_messages([ServiceBusMessage("kept", message_id="s1"),
                                        ServiceBusMessage("cancelled", message_id="s2")], at)
            s.cancel_scheduled_messages(seqs[1])
            delayed = ServiceBusMessage("on send", message_id="s3", scheduled_enqueue_time_utc=at)
            s.send_messages(delayed)
        with self.client.get_queue_receiver("proof-queue") as r:
            got = []
            until = time.time() + 10
            while len(got) < 2 and time.time() < until:
                for m in r.receive_messages(max_message_count=2, max_wait_time=1):
                    got.append((m, datetime.datetime.now(datetime.timezone.utc)))
            self.assertEqual(sorted(m.message_id for m, _ in got), ["s1", "s3"])
            for m, received_at in got:
                self.assertGreaterEqual(received_at, at, "delivered before its time")
                r.complete_message(m)
            self.assertEqual(r.receive_messages(max_wait_time=1), [])

    def test_duplicate_detection(self):
        with self.client.get_queue_sender("proof-dedup") as s:
            for _ in range(3):
                s.send_messages(ServiceBusMessage("once", message_id="same"))
            s.send_messages(ServiceBusMessage("other", message_id="different"))
        with self.client.get_queue_receiver("proof-dedup") as r:
            got = self.drain(r, 3, wait=3)
            self.assertEqual(sorted(m.message_id for m in got), ["different", "same"])
            for m in got:
                r.complete_message(m)

    def test_topic_rules(self):
        messages = [
            ServiceBusMessage("1", message_id="gold-big", subject="order",
                              application_properties={"tier": "gold", "amount": 50, "region": "eu"}),
            ServiceBusMessage("2", message_id="gold-small", subject="invoice",
                              application_properties={"tier": "gold", "amount": 5, "region": "eu"}),
            ServiceBusMessage("3", message_id="silver", subject="order",
                              application_properties={"tier": "silver", "amount": 80, "region": "us"}),
        ]
        with self.client.get_topic_sender("proof-topic") as s:
            s.send_messages(messages)
        want = {"all": ["gold-big", "gold-small", "silver"], "sql": ["gold-big"], "corr": ["gold-big"]}
        for sub, ids in want.items():
            with self.client.get_subscription_receiver("proof-topic", sub) as r:
                got = self.drain(r, len(ids), wait=3)
                got += r.receive_messages(max_wait_time=0.5)
                self.assertEqual(sorted(m.message_id for m in got), sorted(ids), sub)
                for m in got:
                    r.complete_message(m)

    def test_sessions(self):
        with self.client.get_queue_sender("proof-session") as s:
            for i in range(3):
                s.send_messages(ServiceBusMessage("a{}".format(i), session_id="A"))
                s.send_messages(ServiceBusMessage("b{}".format(i), session_id="B"))
        with self.client.get_queue_receiver("proof-session", session_id="B") as r:
            got = self.drain(r, 3)
            self.assertEqual([str(m) for m in got], ["b0", "b1", "b2"])
            self.assertTrue(all(m.session_id == "B" for m in got))
            r.session.set_state(b"checkpoint")
            self.assertEqual(r.session.get_state(), b"checkpoint")
            for m in got:
                r.complete_message(m)
        with self.client.get_queue_receiver("proof-session", session_id=NEXT_AVAILABLE_SESSION) as r:
            got = self.drain(r, 3)
            self.assertEqual(r.session.session_id, "A")
            self.assertEqual([str(m) for m in got], ["a0", "a1", "a2"])
            for m in got:
                r.complete_message(m)

    def test_session_lock_locks_its_messages(self):
        """The session lock is its messages' lock (5 s here): renewing it keeps them past
        their first lock; when it runs out the messages go back to the session."""
        with self.client.get_queue_sender("proof-session-short") as s:
            for i in range(2):
                s.send_messages(ServiceBusMessage("d{}".format(i), session_id="D"))
        with self.client.get_queue_receiver("proof-session-short", session_id="D") as r:
            got = self.drain(r, 2)
            self.assertEqual(sorted(str(m) for m in got), ["d0", "d1"])
            time.sleep(3)
            r.session.renew_lock()
            time.sleep(3)
            r.complete_message(got[0])
            time.sleep(6)
            with self.assertRaises(SessionLockLostError):
                r.complete_message(got[1])
        with self.client.get_queue_receiver("proof-session-short", session_id="D") as r:
            again = self.drain(r, 1)
            self.assertEqual([str(m) for m in again], ["d1"])
            self.assertEqual(again[0].delivery_count, 1)
            r.complete_message(again[0])

    def test_closed_session_receiver_gives_its_messages_back(self):
        """Session messages are locked by the session lock: a session receiver closed
        with messages unsettled lets them go at once, not after the lock (30 s)."""
        with self.client.get_queue_sender("proof-session") as s:
            for i in range(2):
                s.send_messages(ServiceBusMessage("c{}".format(i), session_id="C"))
        with self.client.get_queue_receiver("proof-session", session_id="C") as r:
            self.assertEqual(len(self.drain(r, 2)), 2)
        started = time.time()
        with self.client.get_queue_receiver("proof-session", session_id="C") as r:
            got = self.drain(r, 2)
            self.assertEqual(sorted(str(m) for m in got), ["c0", "c1"])
            self.assertLess(time.time() - started, 10)
            for m in got:
                r.complete_message(m)

    def test_management_api_makes_working_entities(self):
        # The management API is HTTPS on its own port, with a self-signed certificate.
        host = self.management.split("://", 1)[1]
        admin = ServiceBusAdministrationClient.from_connection_string(
            "Endpoint=sb://{};SharedAccessKeyName=RootManageSharedAccessKey;"
            "SharedAccessKey=SAS_KEY_VALUE".format(host), connection_verify=False)
        name = "made-{}".format(uuid.uuid4().hex[:8])
        queue = admin.create_queue(name, max_delivery_count=2,
                                   lock_duration=datetime.timedelta(seconds=7))
        self.assertEqual(queue.max_delivery_count, 2)
        self.assertEqual(admin.get_queue(name).lock_duration, datetime.timedelta(seconds=7))
        with self.assertRaises(ResourceExistsError):
            admin.create_queue(name)
        with self.client.get_queue_sender(name) as s:
            s.send_messages(ServiceBusMessage("x", message_id="made"))
        with self.client.get_queue_receiver(name) as r:
            for _ in range(2):
                got = self.drain(r, 1)
                r.abandon_message(got[0])
        with self.client.get_queue_receiver(name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as d:
            self.assertEqual(self.drain(d, 1)[0].dead_letter_reason, "MaxDeliveryCountExceeded")
        topic = name + "-t"
        admin.create_topic(topic)
        admin.create_subscription(topic, "gold")
        admin.delete_rule(topic, "gold", "$Default")
        admin.create_rule(topic, "gold", "sql", filter=SqlRuleFilter("tier = 'gold'"))
        admin.create_subscription(topic, "eu")
        admin.delete_rule(topic, "eu", "$Default")
        admin.create_rule(topic, "eu", "corr",
                          filter=CorrelationRuleFilter(label="order", properties={"region": "eu"}))
        # Rules read back as the service writes them.
        self.assertEqual(admin.get_rule(topic, "gold", "sql").filter.sql_expression,
                         "tier = 'gold'")
        corr = admin.get_rule(topic, "eu", "corr").filter
        self.assertEqual((corr.label, corr.properties), ("order", {"region": "eu"}))
        with self.client.get_topic_sender(topic) as s:
            s.send_messages([
                ServiceBusMessage("1", message_id="g-eu", subject="order",
                                  application_properties={"tier": "gold", "region": "eu"}),
                ServiceBusMessage("2", message_id="s-eu", subject="order",
                                  application_properties={"tier": "silver", "region": "eu"}),
                ServiceBusMessage("3", message_id="g-us", subject="order",
                                  application_properties={"tier": "gold", "region": "us"}),
            ])
        for sub, ids in (("gold", ["g-eu", "g-us"]), ("eu", ["g-eu", "s-eu"])):
            with self.client.get_subscription_receiver(topic, sub) as r:
                got = self.drain(r, 2)
                got += r.receive_messages(max_wait_time=0.5)
                self.assertEqual(sorted(m.message_id for m in got), ids, sub)
                for m in got:
                    r.complete_message(m)
        admin.delete_queue(name)
        with self.assertRaises(ResourceNotFoundError):
            admin.get_queue(name)

    def test_wrong_key_is_refused(self):
        # CBS put-token and the management API check the SAS signature.
        wrong = self.conn.replace("SharedAccessKey=SAS_KEY_VALUE", "SharedAccessKey=not-the-key")
        with ServiceBusClient.from_connection_string(wrong, retry_total=0) as client:
            with self.assertRaises(ServiceBusAuthenticationError):
                with client.get_queue_sender("proof-queue") as s:
                    s.send_messages(ServiceBusMessage("refused"))
        host = self.management.split("://", 1)[1]
        admin = ServiceBusAdministrationClient.from_connection_string(
            "Endpoint=sb://{};SharedAccessKeyName=RootManageSharedAccessKey;"
            "SharedAccessKey=not-the-key".format(host), connection_verify=False)
        with self.assertRaises(ClientAuthenticationError):
            admin.get_queue("proof-queue")
        with self.client.get_queue_receiver("proof-queue") as r:
            self.assertEqual(r.receive_messages(max_wait_time=1), [])

    def test_token_credential_is_checked(self):
        # An identity's bearer token (CBS type jwt, and Authorization: Bearer on the
        # management API): accepted when signed with the token key for Service Bus.
        host = self.conn.split("sb://", 1)[1].split(";", 1)[0]
        good = EmulatorTokenCredential()
        with ServiceBusClient(host, good, use_tls=False) as client:
            with client.get_queue_sender("proof-queue") as s:
                s.send_messages(ServiceBusMessage("by-token"))
            with client.get_queue_receiver("proof-queue") as r:
                got = self.drain(r, 1)
                self.assertEqual([str(m) for m in got], ["by-token"])
                r.complete_message(got[0])
        # (azure-servicebus asks for "https://servicebus.azure.net//.default")
        self.assertTrue(good.scopes and all(
            s.startswith("https://servicebus.azure.net/") and s.endswith("/.default")
            for s in good.scopes), good.scopes)
        management = self.management.split("://", 1)[1]
        admin = ServiceBusAdministrationClient(management, good, connection_verify=False)
        self.assertEqual(admin.get_queue("proof-queue").name, "proof-queue")
        for bad in (EmulatorTokenCredential(key="another-key"),
                    EmulatorTokenCredential(audience="https://storage.azure.com")):
            with ServiceBusClient(host, bad, use_tls=False, retry_total=0) as client:
                with self.assertRaises(ServiceBusAuthenticationError):
                    with client.get_queue_sender("proof-queue") as s:
                        s.send_messages(ServiceBusMessage("refused"))
            admin = ServiceBusAdministrationClient(management, bad, connection_verify=False)
            with self.assertRaises(ClientAuthenticationError):
                admin.get_queue("proof-queue")

    def test_forced_connection_close_is_survived(self):
        # SIGUSR2: the emulator closes every connection with amqp:connection:forced, as
        # the service does for maintenance; azure-servicebus reconnects and goes on.
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(ServiceBusMessage("before"))
            os.kill(self.proc.pid, signal.SIGUSR2)
            time.sleep(0.5)
            s.send_messages(ServiceBusMessage("after"))
        with self.client.get_queue_receiver("proof-queue") as r:
            got = self.drain(r, 2)
            self.assertEqual(sorted(str(m) for m in got), ["after", "before"])
            for m in got:
                r.complete_message(m)

    def test_receive_and_delete(self):
        with self.client.get_queue_sender("proof-queue") as s:
            s.send_messages(ServiceBusMessage("gone", message_id="rd"))
        with self.client.get_queue_receiver(
                "proof-queue", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
            got = self.drain(r, 1)
            self.assertEqual(got[0].message_id, "rd")
        with self.client.get_queue_receiver("proof-queue") as r:
            self.assertEqual(r.receive_messages(max_wait_time=1), [])


class DuplicateHistoryTest(unittest.TestCase):
    """The duplicate-detection history on its own: repeats within the window are
    caught, and ids past the window are forgotten (not kept or rescanned)."""

    def setUp(self):
        sys.path.insert(0, HERE)
        import emulator

        self.history = emulator.DuplicateHistory()

    def test_a_repeat_within_the_window_is_a_duplicate(self):
        self.assertFalse(self.history.seen_before("a", 600))
        self.assertFalse(self.history.seen_before("b", 600))
        self.assertTrue(self.history.seen_before("a", 600))
        self.assertEqual(list(self.history.taken_at), ["a", "b"])

    def test_ids_past_the_window_are_forgotten(self):
        for n in range(1000):
            self.history.seen_before(n, 600)
        # Backdate the first 900, as if taken 20 minutes ago.
        past = time.time() - 1200
        for n in range(900):
            self.history.taken_at[str(n)] = past
        self.assertFalse(self.history.seen_before("new", 600))
        self.assertEqual(len(self.history.taken_at), 101)
        self.assertFalse(self.history.seen_before(0, 600), "forgotten, so taken again")


if __name__ == "__main__":
    unittest.main()
