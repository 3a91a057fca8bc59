"""An Azure Service Bus AMQP 1.0 emulator for cloudbus's tests, on python-qpid-proton
(an AMQP stack independent of the clients it serves). No Service Bus emulator can run
on the project machines (the official one needs Docker and SQL Edge).

What it does, as Service Bus does over AMQP:
- SASL ANONYMOUS or PLAIN, no TLS (the clients' UseDevelopmentEmulator=true mode).
- CBS: put-token on `$cbs`; a SAS token is checked against the namespace's keys
  (signature, key name, expiry) and refused with 401 as the service does. Any other
  token (what clients send for a Microsoft Entra ID identity) is checked as a
  bearer token (a JWT): signed with the emulator's token key (HS256, standing in for Entra
  ID), audience https://servicebus.azure.net, not expired. The ATOM management API
  checks its Authorization header (SAS, or `Bearer <jwt>`) the same way.
- Queues, and topics with subscriptions (entities from a config file in the official
  emulator's Config.json format). Sending: to `<queue>` or `<topic>`; receiving from
  `<queue>`, `<topic>/Subscriptions/<sub>`, and each one's `/$DeadLetterQueue`.
- Peek-lock: the delivery tag is the lock token (a UUID, little-endian bytes, as the
  service sends it); message annotations x-opt-sequence-number, x-opt-enqueued-time,
  x-opt-locked-until, x-opt-lock-token; header delivery-count = earlier deliveries.
  Dispositions: accepted = complete; modified or released = abandon (the delivery count
  grows; past MaxDeliveryCount the message is dead-lettered with the reason
  MaxDeliveryCountExceeded); modified(undeliverable-here) = defer; rejected with
  com.microsoft:dead-letter = dead-letter with DeadLetterReason and
  DeadLetterErrorDescription. A lock that expires counts as an abandon.
  Receive-and-delete (sender-settle-mode settled) too.
- `$management`: peek-message, renew-lock (several lock tokens at once),
  schedule-message, cancel-scheduled-message, receive-by-sequence-number (deferred
  messages), update-disposition.
- Deferred messages: one taken back by sequence number and then abandoned (or whose
  lock expires) goes back among the deferred ones, counted, as the service does; no
  receive returns it.
- Scheduled messages (x-opt-scheduled-enqueue-time), duplicate detection by
  MessageId within the entity's window.
- Subscription rules: correlation filters and a SQL filter subset (comparisons, AND,
  OR, NOT, IN, LIKE, IS [NOT] NULL, EXISTS over sys.* and user properties).
- The ATOM management API of ServiceBusAdministrationClient, on HTTPS with a
  self-signed certificate on its own port: PUT (create, or update with If-Match: *),
  GET and DELETE of queues, topics, subscriptions (with a default rule) and rules;
  409 for an entity that exists, 404 for one that does not. Entities from the config
  file and from this API are the same kind of thing. (The official emulator has no
  management API; Azure has it at https://<namespace>/.) The management thread and
  the AMQP reactor share the broker; the reactor reads snapshots of its entity maps.

- Sessions: a receiver's source filter com.microsoft:session-filter names a session
  (or is null: the next free session with messages); the session is locked for that
  link, and closing the link (or its connection) gives its locked messages back. The
  session lock locks its messages: renew-session-lock renews both, renew-lock is
  refused (400) on a session entity, and a session lock that runs out detaches the
  link with com.microsoft:session-lock-lost and gives the messages back.
- Links: a detach without close (a client recovering a link) is answered with a
  detach; a closed connection ends its links.

Test faults, asked for by a message's application property `cloudbus-emulator-fault`
(or the CloudEvent extension `emulatorfault`, as `cloudEvents_emulatorfault` or
`cloudEvents:emulatorfault`): `undecodable` delivers it as bytes no AMQP decoder
reads (a data section with an invalid constructor); `no-lock-token` delivers it
without the x-opt-lock-token annotation and with an 8-byte delivery tag. The lock is
held and settled by link disposition as for any message.

What the Rust client (azservicebus on fe2o3-amqp) needs and the Python one does not:
`$management` answers carry AMQP arrays (renew-lock expirations, schedule sequence
numbers), not lists; lock tokens come back in the delivery tag's byte order, not as a
.NET GUID (both are found).

Run: python emulator.py --config config.json [--port 5672] [--management-port N]
[--key-name RootManageSharedAccessKey --key SAS_KEY_VALUE]
[--token-key cloudbus-emulator-token-key];
prints SERVICEBUS_MANAGEMENT_ENDPOINT, SERVICEBUS_CONNECTION_STRING, then "Ready.".
`kill -USR1 <pid>` writes each busy entity's messages, consumers (credit, unsettled),
session owners and locks to stderr; `kill -USR2 <pid>` closes every client connection
with amqp:connection:forced (as the service does for maintenance); PN_TRACE_FRM=1
traces every AMQP frame.
"""

import argparse
import base64
import bisect
import collections
import datetime
import hashlib
import hmac
import http.server
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
import xml.sax.saxutils

from proton import (
    UNDESCRIBED,
    Array,
    Condition,
    Data,
    Delivery,
    Disposition,
    Message,
    symbol,
    timestamp,
    ulong,
)
from proton.handlers import IncomingMessageHandler, MessagingHandler
from proton.reactor import Container
from proton._handlers import IOHandler

# python-qpid-proton 0.40 can queue a timer expiry for a connection's selectable after
# the transport closed and was unbound from it; IOHandler then calls
# `None.capacity()` and the exception ends the reactor (the whole emulator). Seen when a
# client closed a connection under load. An expiry without a transport has nothing to do.
_io_expired = IOHandler.on_selectable_expired


def _on_selectable_expired(self, event):
    if getattr(event.selectable, "_transport", None) is None:
        return
    _io_expired(self, event)


IOHandler.on_selectable_expired = _on_selectable_expired

VERBOSE = os.environ.get("SERVICEBUS_EMULATOR_VERBOSE") == "1"
DLQ = "$deadletterqueue"
VENDOR = "com.microsoft"
# .NET ticks (100 ns) at the Unix epoch: how Service Bus writes session lock times.
DOTNET_EPOCH_TICKS = 621355968000000000


# The namespace's shared access keys (name -> key): --key-name and --key, by default
# the official emulator's RootManageSharedAccessKey / SAS_KEY_VALUE.
KEYS = {"RootManageSharedAccessKey": "SAS_KEY_VALUE"}


def sas_refusal(token):
    """Why a SAS token (`SharedAccessSignature sr=..&sig=..&se=..&skn=..`) is refused,
    or None when one of the namespace's keys signed it and it has not expired. The
    signature is HMAC-SHA256 over the token's (URL-encoded) sr, a newline and se."""
    prefix = "SharedAccessSignature "
    if not isinstance(token, str) or not token.startswith(prefix):
        return "not a SharedAccessSignature"
    fields = dict(p.split("=", 1) for p in token[len(prefix):].split("&") if "=" in p)
    sr, sig, se, skn = (fields.get(k) for k in ("sr", "sig", "se", "skn"))
    if None in (sr, sig, se, skn):
        return "a SharedAccessSignature needs sr, sig, se and skn"
    key = KEYS.get(skn)
    if key is None:
        return "no shared access key named {}".format(skn)
    try:
        if int(se) < time.time():
            return "the token expired"
    except ValueError:
        return "se is not a number"
    expected = base64.b64encode(
        hmac.new(key.encode(), (sr + "\n" + se).encode(), hashlib.sha256).digest()
    ).decode()
    if not hmac.compare_digest(urllib.parse.unquote(sig), expected):
        return "the signature does not match the key {}".format(skn)
    return None


# Stands in for Microsoft Entra ID: bearer tokens (JWTs) signed with this key
# (HS256) are trusted; --token-key changes it.
TOKEN_KEY = {"key": "cloudbus-emulator-token-key"}
# The audience of Entra ID tokens for Service Bus (the scope
# https://servicebus.azure.net/.default).
TOKEN_AUDIENCE = "https://servicebus.azure.net"


def base64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_refusal(token):
    """Why a bearer token (a JWT, as Entra ID issues for an identity) is refused, or
    None when the emulator's token key signed it (HS256), its audience is Service Bus
    and it has not expired. Entra ID signs with RS256 keys of its own; the checks that
    matter to a client (signature, audience, expiry) are the same."""
    if not isinstance(token, str) or token.count(".") != 2:
        return "not a JSON web token"
    head, body, signature = token.split(".")
    try:
        header = json.loads(base64url_decode(head))
        claims = json.loads(base64url_decode(body))
        signature = base64url_decode(signature)
    except ValueError:
        return "the token's parts are not base64url JSON"
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return "the token's parts are not JSON objects"
    if header.get("alg") != "HS256":
        return "the token is not signed with HS256"
    expected = hmac.new(
        TOKEN_KEY["key"].encode(), (head + "." + body).encode(), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(signature, expected):
        return "the token's signature does not match"
    if str(claims.get("aud", "")).rstrip("/") != TOKEN_AUDIENCE:
        return "the token's audience is {!r}, not {}".format(claims.get("aud"), TOKEN_AUDIENCE)
    expiry = claims.get("exp")
    if not isinstance(expiry, (int, float)) or expiry < time.time():
        return "the token expired"
    return None


def access_refusal(token):
    """Why a token is refused: a SAS token or a bearer token, told apart by content
    (azure-servicebus sends SAS tokens with the CBS type `jwt` too)."""
    if isinstance(token, str) and token.startswith("SharedAccessSignature "):
        return sas_refusal(token)
    return token_refusal(token)


def log(*args):
    if VERBOSE:
        print("servicebus-emulator:", *args, file=sys.stderr, flush=True)


def now_ms():
    return int(time.time() * 1000)


def parse_duration(text, default_seconds):
    """ISO 8601 durations as the config uses them (PT1M, PT30S, P1D, PT0.5S)."""
    if not text:
        return default_seconds
    m = re.fullmatch(
        r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?)?", text.strip().upper()
    )
    if not m:
        return default_seconds
    d, h, mi, s = m.groups()
    return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)


# ---------------------------------------------------------------------------------
# SQL filters (the subset cloudbus compiles to, and a little more)

TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?)|(?P<str>'(?:[^']|'')*')|(?P<op><>|!=|>=|<=|=|<|>|\(|\)|,)"
    r"|(?P<id>\[[^\]]+\]|[A-Za-z_][A-Za-z0-9_.\-]*))"
)


class SqlFilter:
    def __init__(self, text):
        self.text = text
        self.tokens = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError("cannot read the SQL filter at {!r}".format(text[pos:]))
            pos = m.end()
            kind = m.lastgroup
            value = m.group(kind)
            if kind == "str":
                value = value[1:-1].replace("''", "'")
            elif kind == "num":
                value = float(value) if "." in value else int(value)
            elif kind == "id" and value.startswith("["):
                value = value[1:-1]
            self.tokens.append((kind, value))
        self.pos = 0
        self.tree = self.parse_or()
        if self.pos != len(self.tokens):
            raise ValueError("unexpected {!r} in the SQL filter".format(self.tokens[self.pos]))

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def keyword(self, word):
        kind, value = self.peek()
        if kind == "id" and str(value).upper() == word:
            self.pos += 1
            return True
        return False

    def take(self, kind=None, value=None):
        k, v = self.peek()
        if k is None or (kind and k != kind) or (value is not None and v != value):
            raise ValueError("expected {} in the SQL filter".format(value or kind))
        self.pos += 1
        return v

    def parse_or(self):
        left = self.parse_and()
        while self.keyword("OR"):
            left = ("or", left, self.parse_and())
        return left

    def parse_and(self):
        left = self.parse_not()
        while self.keyword("AND"):
            left = ("and", left, self.parse_not())
        return left

    def parse_not(self):
        if self.keyword("NOT"):
            return ("not", self.parse_not())
        return self.parse_predicate()

    def parse_predicate(self):
        kind, value = self.peek()
        if kind == "op" and value == "(":
            self.pos += 1
            inner = self.parse_or()
            self.take("op", ")")
            return inner
        if kind == "id" and str(value).upper() == "EXISTS":
            self.pos += 1
            self.take("op", "(")
            name = self.take("id")
            self.take("op", ")")
            return ("exists", name)
        if kind == "id" and str(value).upper() in ("TRUE", "FALSE") and self.pos + 1 >= len(
            self.tokens
        ):
            self.pos += 1
            return ("const", str(value).upper() == "TRUE")
        left = self.parse_operand()
        if self.keyword("IS"):
            negate = self.keyword("NOT")
            if not self.keyword("NULL"):
                raise ValueError("expected NULL after IS")
            return ("isnull", left, negate)
        negate = self.keyword("NOT")
        if self.keyword("IN"):
            self.take("op", "(")
            values = [self.parse_operand()]
            while self.peek() == ("op", ","):
                self.pos += 1
                values.append(self.parse_operand())
            self.take("op", ")")
            return ("in", left, values, negate)
        if self.keyword("LIKE"):
            pattern = self.take("str")
            escape = self.take("str") if self.keyword("ESCAPE") else None
            return ("like", left, pattern, negate, escape)
        op = self.take("op")
        if op not in ("=", "<>", "!=", ">", "<", ">=", "<="):
            raise ValueError("unexpected operator {}".format(op))
        return ("cmp", op, left, self.parse_operand())

    def parse_operand(self):
        kind, value = self.peek()
        self.pos += 1
        if kind in ("num", "str"):
            return ("lit", value)
        if kind == "id":
            if str(value).upper() == "NULL":
                return ("lit", None)
            if str(value).upper() in ("TRUE", "FALSE"):
                return ("lit", str(value).upper() == "TRUE")
            return ("prop", value)
        raise ValueError("expected a value in the SQL filter")

    def matches(self, props):
        return self.eval(self.tree, props) is True

    def value(self, operand, props):
        if operand[0] == "lit":
            return operand[1]
        return props.get(operand[1].lower())

    def eval(self, node, props):
        kind = node[0]
        if kind == "const":
            return node[1]
        if kind == "or":
            return self.eval(node[1], props) is True or self.eval(node[2], props) is True
        if kind == "and":
            return self.eval(node[1], props) is True and self.eval(node[2], props) is True
        if kind == "not":
            return not (self.eval(node[1], props) is True)
        if kind == "exists":
            return node[1].lower() in props
        if kind == "isnull":
            is_null = self.value(node[1], props) is None
            return (not is_null) if node[2] else is_null
        if kind == "in":
            v = self.value(node[1], props)
            found = v is not None and any(v == self.value(x, props) for x in node[2])
            return (not found) if node[3] else found
        if kind == "like":
            v = self.value(node[1], props)
            if not isinstance(v, str):
                return False
            regex, escape, chars = "^", node[4], iter(node[2])
            for c in chars:
                if escape and c == escape:
                    regex += re.escape(next(chars, ""))
                elif c == "%":
                    regex += ".*"
                elif c == "_":
                    regex += "."
                else:
                    regex += re.escape(c)
            regex += "$"
            found = re.match(regex, v, re.S) is not None
            return (not found) if node[3] else found
        if kind == "cmp":
            a, b = self.value(node[2], props), self.value(node[3], props)
            if a is None or b is None:
                return None
            try:
                return {
                    "=": a == b,
                    "<>": a != b,
                    "!=": a != b,
                    ">": a > b,
                    "<": a < b,
                    ">=": a >= b,
                    "<=": a <= b,
                }[node[1]]
            except TypeError:
                return False
        raise ValueError(kind)


def message_properties(message):
    """The properties a rule sees: sys.* and user properties, keys lower-cased."""
    props = {}
    for k, v in (message.properties or {}).items():
        props[str(k).lower()] = v
    sysprops = {
        "sys.messageid": message.id,
        "sys.correlationid": message.correlation_id,
        "sys.label": message.subject,
        "sys.to": message.address,
        "sys.replyto": message.reply_to,
        "sys.sessionid": message.group_id,
        "sys.contenttype": message.content_type,
    }
    for k, v in sysprops.items():
        if v is not None:
            props[k] = str(v) if not isinstance(v, (int, float, bool)) else v
    return props


class Rule:
    def __init__(self, name, spec):
        self.name = name
        props = spec.get("Properties", spec)
        kind = props.get("FilterType", "Sql")
        self.sql = None
        self.correlation = None
        if kind.lower() == "correlation":
            self.correlation = props.get("CorrelationFilter", {})
        else:
            self.sql = SqlFilter(props.get("SqlFilter", {}).get("SqlExpression", "1=1"))

    def matches(self, message):
        props = message_properties(message)
        if self.sql is not None:
            return self.sql.matches(props)
        c = self.correlation
        system = {
            "CorrelationId": "sys.correlationid",
            "MessageId": "sys.messageid",
            "To": "sys.to",
            "ReplyTo": "sys.replyto",
            "Label": "sys.label",
            "Subject": "sys.label",
            "SessionId": "sys.sessionid",
            "ContentType": "sys.contenttype",
        }
        for key, sysname in system.items():
            if key in c and c[key] is not None and props.get(sysname) != c[key]:
                return False
        for k, v in (c.get("Properties") or {}).items():
            if props.get(k.lower()) != v:
                return False
        return True


# ---------------------------------------------------------------------------------
# Entities


class Stored:
    def __init__(self, message, seq):
        self.message = message
        self.seq = seq
        # Read once: proton's accessors decode from C, and session deliveries scan
        # the ready list by session.
        self.session = message.group_id
        self.enqueued = now_ms()
        self.deliveries = 0
        self.lock_token = None
        self.locked_until = 0
        self.link = None
        self.delivery = None
        # Taken back by sequence number: an abandon puts it back among the deferred.
        self.from_deferred = False


class DuplicateHistory:
    """The message ids an entity took within its duplicate-detection window, oldest
    first, so that forgetting the expired ones costs what is forgotten (rebuilding
    the whole history on every message made a send of n messages O(n^2))."""

    def __init__(self):
        self.taken_at = collections.OrderedDict()

    def seen_before(self, message_id, window):
        """True when `message_id` was taken within the last `window` seconds; else
        remembers it as taken now."""
        now = time.time()
        cutoff = now - window
        while self.taken_at:
            oldest = next(iter(self.taken_at))
            if self.taken_at[oldest] >= cutoff:
                break
            self.taken_at.popitem(last=False)
        key = str(message_id)
        if key in self.taken_at:
            return True
        self.taken_at[key] = now
        return False


class Entity:
    """A queue, a subscription, or one's dead-letter queue: something to receive from."""

    def __init__(self, name, props, broker, dead_letter_of=None):
        self.name = name
        self.broker = broker
        self.configure(props)
        self.ready = []
        self.locked = {}
        self.deferred = {}
        self.scheduled = {}
        self.seen_ids = DuplicateHistory()
        self.consumers = []
        self.session_owners = {}
        self.session_states = {}
        self.session_locked_until = {}
        self.dead_letter_of = dead_letter_of
        self.dlq = None if dead_letter_of else Entity(name + "/$DeadLetterQueue", {}, broker, self)

    def configure(self, props):
        """Sets the properties of a QueueDescription or SubscriptionDescription."""
        self.max_delivery_count = int(props.get("MaxDeliveryCount", 10))
        self.lock_seconds = parse_duration(props.get("LockDuration"), 60)
        self.requires_session = bool(props.get("RequiresSession", False))
        self.user_metadata = props.get("UserMetadata", "")
        self.duplicate_detection = bool(props.get("RequiresDuplicateDetection", False))
        self.duplicate_window = parse_duration(
            props.get("DuplicateDetectionHistoryTimeWindow"), 600
        )

    def enqueue(self, message, scheduled_at=None):
        if self.duplicate_detection and message.id is not None:
            if self.seen_ids.seen_before(message.id, self.duplicate_window):
                log("duplicate dropped", self.name, message.id)
                return None
        stored = Stored(message, self.broker.next_seq())
        if scheduled_at and scheduled_at > now_ms():
            self.scheduled[stored.seq] = (scheduled_at, stored)
            return stored.seq
        self.ready.append(stored)
        self.broker.pump(self)
        return stored.seq

    def release_scheduled(self):
        due = [s for s, (at, _) in self.scheduled.items() if at <= now_ms()]
        for seq in due:
            _, stored = self.scheduled.pop(seq)
            stored.enqueued = now_ms()
            self.ready.append(stored)
        if due:
            self.broker.pump(self)

    def lock_deadline(self):
        """When a lock taken (or renewed) now ends: the entity's lock duration on."""
        return now_ms() + int(self.lock_seconds * 1000)

    def sessions_ready(self):
        """Session ids with ready messages, in the order of their first message."""
        seen = {}
        for stored in self.ready:
            if stored.session is not None:
                seen.setdefault(stored.session, None)
        return list(seen)

    def lock_session(self, session_id, link):
        """Locks `session_id` (None: the next one with messages and no owner) for
        `link`; returns the session id, or None when none can be locked."""
        owners = self.session_owners
        # An owner whose link is gone lets its session go here. One whose lock ran out
        # but whose link is still attached keeps it until the timer detaches that link
        # with session-lock-lost (expired_session_links) and gives its messages back
        # once: forgetting it here left the link attached with the session, and its
        # message was given back by its own lock and delivered to it again.
        for sid, owner in list(owners.items()):
            if owner not in self.consumers:
                owners.pop(sid, None)
        if session_id is None:
            session_id = next((sid for sid in self.sessions_ready() if sid not in owners), None)
            if session_id is None:
                return None
        elif session_id in owners and owners[session_id] != link:
            return None
        owners[session_id] = link
        self.session_locked_until[session_id] = self.lock_deadline()
        return session_id

    def dead_letter(self, stored, reason, description):
        message = stored.message
        props = dict(message.properties or {})
        props["DeadLetterReason"] = reason
        if description is not None:
            props["DeadLetterErrorDescription"] = description
        message.properties = props
        annotations = dict(message.annotations or {})
        annotations[symbol("x-opt-deadletter-source")] = self.name
        message.annotations = annotations
        dead = Stored(message, stored.seq)
        dead.deliveries = stored.deliveries
        self.dlq.ready.append(dead)
        self.broker.pump(self.dlq)

    def lock(self, stored, link):
        stored.lock_token = uuid.uuid4()
        # A session's messages are locked by the session lock.
        session = getattr(link, "cloudbus_session", None)
        stored.locked_until = self.session_locked_until.get(session) or self.lock_deadline()
        stored.link = link
        self.locked[stored.lock_token] = stored

    def renew_session_lock(self, session):
        """The session lock and its messages' locks run for another lock duration."""
        until = self.session_locked_until[session] = self.lock_deadline()
        owner = self.session_owners.get(session)
        for stored in self.locked.values():
            if owner is not None and stored.session == session and stored.link == owner:
                stored.locked_until = until
        return until

    def expired_session_links(self):
        """Links whose session lock ran out (no renew-session-lock in time); their
        sessions are free again."""
        expired = []
        for session, owner in list(self.session_owners.items()):
            if self.session_locked_until.get(session, 0) <= now_ms():
                del self.session_owners[session]
                if owner in self.consumers:
                    expired.append((session, owner))
        return expired

    def abandon(self, stored, count=True):
        self.locked.pop(stored.lock_token, None)
        if count:
            stored.deliveries += 1
        if stored.from_deferred and not (
            self.dead_letter_of is None and stored.deliveries >= self.max_delivery_count
        ):
            # A deferred message taken back by sequence number stays deferred when it
            # is abandoned or its lock expires: only receive-by-sequence-number sees it.
            self.deferred[stored.seq] = stored
            return
        if self.dead_letter_of is None and stored.deliveries >= self.max_delivery_count:
            self.dead_letter(
                stored,
                "MaxDeliveryCountExceeded",
                "Message could not be consumed after {} delivery attempts.".format(
                    self.max_delivery_count
                ),
            )
        else:
            bisect.insort(self.ready, stored, key=lambda s: s.seq)
            self.broker.pump(self)

    def expire_locks(self):
        for token, stored in list(self.locked.items()):
            if stored.locked_until <= now_ms():
                log("lock expired", self.name, stored.seq)
                self.lose_lock(stored)

    def lose_lock(self, stored):
        """A lock that ends without a settlement (expired, or its session closed):
        the delivery is settled on the link and counts as an abandon."""
        if stored.delivery is not None and not stored.delivery.settled:
            stored.delivery.settle()
        self.abandon(stored)

    def find_lock(self, token):
        """The locked message of a lock token. Clients that take the token from the
        delivery tag differ in byte order: azure-servicebus reads the tag as a .NET GUID
        (bytes_le), azservicebus (Rust) sends the tag's bytes back as they are."""
        stored = self.locked.get(token)
        if stored is None and isinstance(token, uuid.UUID):
            stored = self.locked.get(uuid.UUID(bytes_le=token.bytes))
        return stored

    def settle(self, token, status, reason=None, description=None):
        stored = self.find_lock(token)
        if stored is None:
            return False
        token = stored.lock_token
        if status == "completed":
            self.locked.pop(token, None)
        elif status == "abandoned":
            self.abandon(stored)
        elif status == "defered":
            self.locked.pop(token, None)
            stored.deliveries += 1
            self.deferred[stored.seq] = stored
        elif status == "suspended":
            self.locked.pop(token, None)
            self.dead_letter(stored, reason or "", description)
        return True


class Topic:
    def __init__(self, name, props, broker):
        self.name = name
        self.duplicate_detection = bool(props.get("RequiresDuplicateDetection", False))
        self.duplicate_window = parse_duration(
            props.get("DuplicateDetectionHistoryTimeWindow"), 600
        )
        self.seen_ids = DuplicateHistory()
        self.subscriptions = {}
        self.broker = broker

    def enqueue(self, message, scheduled_at=None):
        if self.duplicate_detection and message.id is not None:
            if self.seen_ids.seen_before(message.id, self.duplicate_window):
                return None
        seq = None
        for sub, rules in list(self.subscriptions.values()):
            if any(r.matches(message) for r in list(rules.values())):
                seq = sub.enqueue(copy_message(message), scheduled_at) or seq
        return seq if seq is not None else self.broker.next_seq()


class Broker:
    def __init__(self, config):
        self.lock = threading.Lock()
        self.seq = 0
        self.queues = {}
        self.topics = {}
        self.links = {}
        for ns in config.get("UserConfig", config).get("Namespaces", [{}]):
            for q in ns.get("Queues", []):
                self.queues[q["Name"].lower()] = Entity(q["Name"], q.get("Properties", {}), self)
            for t in ns.get("Topics", []):
                topic = Topic(t["Name"], t.get("Properties", {}), self)
                for s in t.get("Subscriptions", []):
                    entity = Entity(
                        "{}/Subscriptions/{}".format(t["Name"], s["Name"]),
                        s.get("Properties", {}),
                        self,
                    )
                    rules = {
                        r["Name"]: Rule(r["Name"], r) for r in s.get("Rules", [])
                    } or {"$Default": Rule("$Default", {"FilterType": "Sql",
                                                        "SqlFilter": {"SqlExpression": "1=1"}})}
                    topic.subscriptions[s["Name"].lower()] = (entity, rules)
                self.topics[t["Name"].lower()] = topic

    def next_seq(self):
        self.seq += 1
        return self.seq

    def entities(self):
        # Snapshots: the management API (another thread) adds and removes entities.
        for q in list(self.queues.values()):
            yield q
            yield q.dlq
        for t in list(self.topics.values()):
            for sub, _ in list(t.subscriptions.values()):
                yield sub
                yield sub.dlq

    def resolve(self, address):
        """(kind, object) for an address: a queue/subscription Entity, or a Topic."""
        path = (address or "").strip("/")
        if "://" in path:
            path = path.split("://", 1)[1].split("/", 1)[1] if "/" in path.split("://", 1)[1] else ""
        parts = path.split("/")
        low = [p.lower() for p in parts]
        dead = low[-1] == DLQ
        if dead:
            low = low[:-1]
        entity = None
        if len(low) == 1 and low[0] in self.queues:
            entity = self.queues[low[0]]
        elif len(low) == 1 and low[0] in self.topics:
            return "topic", self.topics[low[0]]
        elif len(low) == 3 and low[1] == "subscriptions" and low[0] in self.topics:
            sub = self.topics[low[0]].subscriptions.get(low[2])
            entity = sub[0] if sub else None
        if entity is None:
            return None, None
        return "entity", entity.dlq if dead else entity

    def pump(self, entity):
        for link in list(entity.consumers):
            deliver(self, entity, link)


def copy_message(source):
    """A message of our own: proton's received bodies point into its buffers."""
    message = Message()
    message.decode(source.encode())
    if isinstance(message.body, memoryview):
        message.body = bytes(message.body)
    return message


def is_encoded_message(blob):
    return len(blob) >= 3 and blob[0] == 0 and blob[1] == 0x53 and 0x70 <= blob[2] <= 0x78


def messages_of(raw):
    """The messages of one transfer. A batch (message format 0x80013700, which proton
    does not expose) carries each message encoded in its own Data section; it is
    recognised by every Data section holding an encoded AMQP message."""
    blobs = []
    data = Data()
    pos = 0
    try:
        while pos < len(raw):
            data.clear()
            used = data.decode(raw[pos:])
            if used <= 0:
                break
            pos += used
            data.rewind()
            data.next()
            if not data.is_described():
                continue
            data.enter()
            data.next()
            code = data.get_object()
            data.next()
            if code == 0x75:
                blobs.append(bytes(data.get_binary()))
            data.exit()
    except Exception:  # noqa: BLE001 - not a batch; read it as one message
        blobs = []
    if blobs and all(is_encoded_message(b) for b in blobs):
        out = []
        for b in blobs:
            m = Message()
            m.decode(b)
            out.append(copy_message(m))
        return out
    m = Message()
    m.decode(raw)
    return [copy_message(m)]


class RawIncoming(IncomingMessageHandler):
    """Reads transfers as raw bytes, so that batches can be taken apart."""

    def on_delivery(self, event):
        dlv = event.delivery
        if not dlv.link.is_receiver or dlv.aborted:
            if dlv.aborted:
                dlv.settle()
            return
        if dlv.readable and not dlv.partial:
            raw = dlv.link.recv(dlv.pending)
            dlv.link.advance()
            self.delegate.on_raw_message(event, raw)


def encode_message(stored, entity, lock=True):
    message = copy_message(stored.message)
    annotations = dict(message.annotations or {})
    annotations[symbol("x-opt-sequence-number")] = stored.seq
    annotations[symbol("x-opt-enqueued-time")] = timestamp(stored.enqueued)
    if lock and stored.lock_token is not None:
        annotations[symbol("x-opt-locked-until")] = timestamp(stored.locked_until)
        annotations[symbol("x-opt-lock-token")] = stored.lock_token
    message.annotations = annotations
    message.delivery_count = stored.deliveries
    message.first_acquirer = stored.deliveries == 0
    return message


def encode_with_header(message):
    """The message's bytes with a header section written out in full: proton leaves out
    fields at their defaults, but clients read a missing delivery-count as unknown,
    not as 0."""
    durable, priority, ttl = message.durable, message.priority, message.ttl
    first, count = message.first_acquirer, message.delivery_count
    message.durable, message.priority, message.ttl = False, 4, 0
    message.first_acquirer, message.delivery_count = False, 0
    body = bytes(message.encode())
    if body.startswith(b"\x00\x53\x70\x45"):  # proton's empty header section
        body = body[4:]
    message.durable, message.priority, message.ttl = durable, priority, ttl
    message.first_acquirer, message.delivery_count = first, count
    fields = bytes([0x41 if durable else 0x42, 0x50, priority & 0xFF])
    fields += bytes([0x40]) if not ttl else b"\x70" + int(ttl * 1000).to_bytes(4, "big")
    fields += bytes([0x41 if first else 0x42])
    fields += b"\x70" + int(count).to_bytes(4, "big")
    header = b"\x00\x53\x70\xc0" + bytes([len(fields) + 1, 5]) + fields
    return header + body


def fault_of(stored):
    """The test fault a message asks for (see the module comment), or None."""
    props = stored.message.properties or {}
    for key in ("cloudbus-emulator-fault", "cloudEvents_emulatorfault", "cloudEvents:emulatorfault"):
        value = props.get(key)
        if value:
            return str(value)
    return None


# A data section whose value has no valid constructor (0xee is none of AMQP's format
# codes): no decoder can read the message.
UNDECODABLE_SECTION = b"\x00\x53\x75\xee"


def delivery_of(stored, entity, peek_lock):
    """The delivery tag and the bytes of a delivery of `stored` (locked first when
    `peek_lock`), with the test fault it asks for."""
    # Dead letters are delivered as they are: a redrive must be able to read them.
    fault = fault_of(stored) if entity.dead_letter_of is None else None
    tag = stored.lock_token.bytes_le if peek_lock else uuid.uuid4().bytes_le
    message = encode_message(stored, entity, lock=peek_lock)
    if fault == "no-lock-token" and peek_lock:
        tag = tag[:8]
        annotations = dict(message.annotations or {})
        annotations.pop(symbol("x-opt-lock-token"), None)
        message.annotations = annotations
    wire = encode_with_header(message)
    if fault == "undecodable":
        # The header section (its list8 size byte says how long), then the bad section.
        wire = wire[: 5 + wire[4]] + UNDECODABLE_SECTION
    return tag, wire


def deliver(broker, entity, link):
    """Sends ready messages to a consumer link while it has credit."""
    session_id = getattr(link, "cloudbus_session", None)
    credit = link.credit
    if credit <= 0 or not entity.ready:
        return
    if session_id is not None and entity.session_locked_until.get(session_id, 0) <= now_ms():
        # The session's lock ran out: its link is about to be detached, and what it
        # was sent now would be lost with it.
        return
    if session_id is None:
        taken = entity.ready[:credit]
        del entity.ready[:credit]
    else:
        # One pass over the ready list (a delivery per scan made a burst of a few
        # hundred session messages take seconds, longer than clients wait).
        taken, kept = [], []
        for stored in entity.ready:
            if len(taken) < credit and stored.session == session_id:
                taken.append(stored)
            else:
                kept.append(stored)
        entity.ready[:] = kept
    for stored in taken:
        peek_lock = link.remote_snd_settle_mode != 1  # 1 = settled: receive-and-delete
        if peek_lock:
            entity.lock(stored, link)
        tag, wire = delivery_of(stored, entity, peek_lock)
        delivery = link.delivery(tag)
        link.stream(wire)
        link.advance()
        if peek_lock:
            stored.delivery = delivery
            delivery.cloudbus = (entity, stored.lock_token)
        else:
            delivery.settle()


def plain(value):
    """Proton's AMQP arrays as Python lists, recursively."""
    if hasattr(value, "elements") and hasattr(value, "type"):
        return [plain(v) for v in value.elements]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def status_response(request, code, description="", body=None):
    response = Message()
    response.address = request.reply_to
    response.correlation_id = request.id if request.id is not None else request.correlation_id
    response.properties = {
        "statusCode": code,
        "status-code": code,
        "statusDescription": description,
        "status-description": description,
    }
    response.body = body
    return response


class Handler(MessagingHandler):
    def __init__(self, broker, address):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=False, peer_close_is_error=False)
        self.handlers = [
            RawIncoming(False, self) if isinstance(h, IncomingMessageHandler) else h
            for h in self.handlers
        ]
        self.broker = broker
        self.address = address

    dump_requested = False
    close_requested = False

    def on_start(self, event):
        self.connections = set()
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "dump_requested", True))
        signal.signal(signal.SIGUSR2, lambda *_: setattr(self, "close_requested", True))
        self.acceptor = event.container.listen(self.address)
        event.container.schedule(0.1, self)
        print("Ready.", flush=True)

    def dump(self):
        """The broker's state on stderr (SIGUSR1 asks for it at the next tick)."""
        for e in self.broker.entities():
            if not (e.ready or e.locked or e.scheduled or e.consumers or e.session_owners):
                continue
            sys.stderr.write("{}: ready={} locked={} scheduled={} deferred={}\n".format(
                e.name, len(e.ready), len(e.locked), len(e.scheduled), len(e.deferred)))
            for link in e.consumers:
                sys.stderr.write("  consumer {} session={} credit={} queued={} unsettled={}\n".format(
                    link.name, getattr(link, "cloudbus_session", None), link.credit,
                    link.queued, link.unsettled))
            for sid, owner in e.session_owners.items():
                sys.stderr.write("  session {} owner={} locked_until={}\n".format(
                    sid, getattr(owner, "name", owner), e.session_locked_until.get(sid)))
            by_link = {}
            for stored in e.locked.values():
                by_link.setdefault(stored.link, []).append(stored)
            for link, held in by_link.items():
                sys.stderr.write("  {} locked by {} ({}), groups {}\n".format(
                    len(held), getattr(link, "name", None),
                    "a consumer" if link in e.consumers else "gone",
                    sorted({s.session for s in held}, key=str)))
        sys.stderr.flush()

    def on_timer_task(self, event):
        if self.dump_requested:
            self.dump_requested = False
            self.dump()
        if self.close_requested:
            self.close_requested = False
            self.close_connections()
        for entity in self.broker.entities():
            entity.release_scheduled()
            for session, link in entity.expired_session_links():
                # As the service does: the link is detached with session-lock-lost and
                # the session's locked messages go back.
                log("session lock expired", entity.name, session)
                link.condition = Condition(
                    VENDOR + ":session-lock-lost",
                    "the lock of session {} expired".format(session))
                link.close()
                self.forget(link)
            entity.expire_locks()
        event.container.schedule(0.1, self)

    def close_connections(self):
        """Closes every client connection with amqp:connection:forced, as the service
        does for maintenance or an idle connection (SIGUSR2 asks for it)."""
        for connection in list(self.connections):
            log("closing a connection (forced)")
            # With an info map, as the service sends (azure-servicebus reads it).
            connection.condition = Condition(
                "amqp:connection:forced", "the emulator closed the connection (SIGUSR2)",
                {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())})
            connection.close()
            self.forget_links_of(connection)
        self.connections.clear()

    def on_connection_opened(self, event):
        self.connections.add(event.connection)

    def on_connection_init(self, event):
        sasl = event.transport.sasl()
        sasl.allowed_mechs("ANONYMOUS PLAIN")

    def on_link_opening(self, event):
        link = event.link
        if link.remote_source.address is not None:
            link.source.address = link.remote_source.address
        if link.remote_target.address is not None:
            link.target.address = link.remote_target.address
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        address = link.remote_source.address if link.is_sender else link.remote_target.address
        node = (address or "").rstrip("/").split("/")[-1].lower()
        link.cloudbus_node = node
        if node in ("$cbs", "$management"):
            link.cloudbus_entity = None
            if not link.is_sender:
                link.flow(100)
            link.open()
            return
        kind, entity = self.broker.resolve(address)
        if kind is None:
            link.condition = Condition(
                "amqp:not-found",
                "The messaging entity '{}' could not be found.".format(address),
            )
            link.open()
            link.close()
            return
        link.cloudbus_entity = entity
        if link.is_sender:
            if kind != "entity":
                link.condition = Condition("amqp:not-allowed", "cannot receive from a topic")
                link.open()
                link.close()
                return
            filters = {}
            if link.remote_source.filter is not None:
                try:
                    data = link.remote_source.filter
                    data.rewind()
                    filters = (data.get_object() if data.next() else None) or {}
                except Exception as e:  # noqa: BLE001 - no usable filter
                    log("unreadable source filter", repr(e))
                    filters = {}
                log("source filter", filters)
            session_key = symbol(VENDOR + ":session-filter")
            if entity.requires_session or session_key in filters:
                wanted = filters.get(session_key)
                wanted = getattr(wanted, "value", wanted)
                session_id = entity.lock_session(wanted, link)
                if session_id is None:
                    link.condition = Condition(
                        VENDOR + ":session-cannot-be-locked"
                        if wanted is not None
                        else VENDOR + ":timeout",
                        "no session is available"
                        if wanted is None
                        else "session {} is locked by another receiver".format(wanted),
                    )
                    link.open()
                    link.close()
                    return
                link.cloudbus_session = session_id
                link.source.filter.put_object({session_key: session_id})
                link.properties = {
                    symbol(VENDOR + ":locked-until-utc"): DOTNET_EPOCH_TICKS
                    + entity.session_locked_until[session_id] * 10000
                }
            link.open()
            entity.consumers.append(link)
        else:
            link.open()
            link.flow(1000)

    def on_link_closing(self, event):
        self.forget(event.link)
        event.link.close()

    def on_link_closed(self, event):
        self.forget(event.link)

    def on_link_remote_detach(self, event):
        """A detach without close (a client that recovers a link detaches it and attaches
        again): answered with a detach, as the spec requires; proton's handlers only
        answer a closing detach, and a client waits for the answer."""
        self.forget(event.link)
        event.link.detach()

    def on_disconnected(self, event):
        self.connections.discard(event.connection)
        self.forget_links_of(event.connection)

    def on_connection_closing(self, event):
        """A client closed its connection (proton's on_disconnected only comes when the
        socket drops without a close): its links end with it."""
        self.forget_links_of(event.connection)

    def on_connection_closed(self, event):
        self.connections.discard(event.connection)
        self.forget_links_of(event.connection)

    def on_connection_error(self, event):
        self.forget_links_of(event.connection)

    def forget_links_of(self, connection):
        if connection is None:
            return
        link = connection.link_head(0)
        while link:
            self.forget(link)
            link = link.next(0)

    def forget(self, link):
        entity = getattr(link, "cloudbus_entity", None)
        if entity is not None and link in getattr(entity, "consumers", []):
            entity.consumers.remove(link)
            if getattr(link, "cloudbus_session", None) is not None:
                # A session's messages are locked by the session lock: closing the
                # session receiver gives them back at once (as a lost lock, counted).
                for stored in [s for s in entity.locked.values() if s.link == link]:
                    entity.lose_lock(stored)
            # Other messages locked by this link stay locked until their lock
            # expires, as the service does.

    def on_sendable(self, event):
        entity = getattr(event.link, "cloudbus_entity", None)
        if isinstance(entity, Entity):
            deliver(self.broker, entity, event.link)

    def on_link_flow(self, event):
        """Delivers on new credit; on a drain request, sends what is ready and then
        gives the rest of the credit back (as the service does), so that a receiver
        that stops waiting does not keep credit that would lock messages later."""
        link = event.link
        if link.is_sender and link.drain_mode:
            entity = getattr(link, "cloudbus_entity", None)
            if isinstance(entity, Entity):
                deliver(self.broker, entity, link)
            link.drained()

    def on_raw_message(self, event, raw):
        link = event.link
        node = getattr(link, "cloudbus_node", "")
        messages = messages_of(raw)
        message = messages[0]
        if node in ("$cbs", "$management"):
            if node == "$management":
                response = self.management(link, message)
            else:
                refusal = access_refusal(message.body)
                if refusal is not None:
                    log("put-token refused:", refusal)
                response = status_response(
                    message, 202 if refusal is None else 401,
                    "Accepted" if refusal is None else "Unauthorized: " + refusal)
            self.reply(event, response)
            self.accept(event.delivery)
            # Requests never run out of credit (a client puts a token for every link
            # it opens: the first 100 were all there was).
            if link.credit < 50:
                link.flow(100)
            return
        entity = link.cloudbus_entity
        if entity is None:
            self.reject(event.delivery)
            return
        for message in messages:
            scheduled = (message.annotations or {}).get(symbol("x-opt-scheduled-enqueue-time"))
            entity.enqueue(message, int(scheduled) if scheduled else None)
        self.accept(event.delivery)
        if link.credit < 100:
            link.flow(1000)

    def reply(self, event, response):
        """Sends a request/response answer on the connection's link to `reply_to`."""
        connection = event.connection
        link = connection.link_head(0)
        fallback = None
        while link:
            if link.is_sender and getattr(link, "cloudbus_node", "") == event.link.cloudbus_node:
                if link.remote_target.address == response.address:
                    break
                if link.session == event.link.session:
                    fallback = link
            link = link.next(0)
        link = link or fallback
        if link is None:
            log("no link to answer", response.address)
            return
        link.send(response).settle()

    def management(self, link, request):
        op = (request.properties or {}).get("operation")
        body = plain(request.body or {})
        log("management", op, body)
        address = link.remote_target.address or ""
        entity_address = address.rsplit("/", 1)[0]
        kind, entity = self.broker.resolve(entity_address)
        if kind is None:
            return status_response(request, 404, "entity {} not found".format(entity_address))
        try:
            if op == VENDOR + ":peek-message":
                return self.peek(request, entity, body)
            if op == VENDOR + ":renew-lock":
                if entity.requires_session:
                    # Session messages are locked by the session lock (renew-session-lock);
                    # Microsoft's clients refuse this before asking.
                    return status_response(
                        request, 400,
                        "renew-lock is not supported on session entities; renew the session lock")
                expirations = []
                for token in body.get("lock-tokens", []):
                    stored = entity.find_lock(token)
                    if stored is None:
                        return status_response(request, 410, "lock lost")
                    stored.locked_until = entity.lock_deadline()
                    expirations.append(timestamp(stored.locked_until))
                # An AMQP array of timestamps, as the service answers (not a list).
                return status_response(request, 200, "OK", {
                    "expirations": Array(UNDESCRIBED, Data.TIMESTAMP, *expirations)})
            if op == VENDOR + ":schedule-message":
                seqs = []
                target = entity
                for item in body.get("messages", []):
                    message = Message()
                    message.decode(bytes(item["message"]))
                    message = copy_message(message)
                    at = (message.annotations or {}).get(symbol("x-opt-scheduled-enqueue-time"))
                    seq = target.enqueue(message, int(at) if at else None)
                    seqs.append(seq if seq is not None else 0)
                return status_response(request, 200, "OK", {
                    "sequence-numbers": Array(UNDESCRIBED, Data.LONG, *seqs)})
            if op == VENDOR + ":cancel-scheduled-message":
                for seq in body.get("sequence-numbers", []):
                    for e in self.broker.entities():
                        e.scheduled.pop(int(seq), None)
                return status_response(request, 200, "OK")
            if op == VENDOR + ":receive-by-sequence-number":
                out = []
                for seq in body.get("sequence-numbers", []):
                    stored = entity.deferred.pop(int(seq), None)
                    if stored is None:
                        return status_response(
                            request, 410, "message {} not found".format(seq), None
                        )
                    stored.from_deferred = True
                    entity.lock(stored, None)
                    out.append(
                        {
                            "message": encode_with_header(encode_message(stored, entity)),
                            "lock-token": stored.lock_token,
                        }
                    )
                return status_response(request, 200, "OK", {"messages": out})
            if op == VENDOR + ":update-disposition":
                status = body.get("disposition-status")
                for token in body.get("lock-tokens", []):
                    if not entity.settle(
                        token,
                        status,
                        body.get("deadletter-reason"),
                        body.get("deadletter-description"),
                    ):
                        return status_response(request, 410, "lock lost")
                return status_response(request, 200, "OK")
            if op in (
                VENDOR + ":get-session-state",
                VENDOR + ":set-session-state",
                VENDOR + ":renew-session-lock",
            ):
                sid = body.get("session-id")
                if op.endswith("set-session-state"):
                    state = body.get("session-state")
                    entity.session_states[sid] = bytes(state) if state is not None else None
                    return status_response(request, 200, "OK")
                if op.endswith("get-session-state"):
                    return status_response(
                        request, 200, "OK", {"session-state": entity.session_states.get(sid)}
                    )
                if sid not in entity.session_owners:
                    return status_response(request, 410, "the lock of session {} is lost".format(sid))
                until = entity.renew_session_lock(sid)
                return status_response(request, 200, "OK", {"expiration": timestamp(until)})
        except (KeyError, ValueError, TypeError) as e:
            return status_response(request, 400, "bad request: {}".format(e))
        return status_response(request, 501, "operation {} is not emulated".format(op))

    def peek(self, request, entity, body):
        start = int(body.get("from-sequence-number", 0))
        count = int(body.get("message-count", 1))
        pool = sorted(
            list(entity.ready)
            + list(entity.locked.values())
            + list(entity.deferred.values())
            + [s for _, s in entity.scheduled.values()],
            key=lambda s: s.seq,
        )
        found = [s for s in pool if s.seq >= start][:count]
        if not found:
            return status_response(request, 204, "No Content")
        messages = [
            {"message": encode_with_header(encode_message(s, entity, lock=False))} for s in found
        ]
        return status_response(request, 200, "OK", {"messages": messages})

    def settled_by_peer(self, event, status, reason=None, description=None):
        entity, token = getattr(event.delivery, "cloudbus", (None, None))
        if entity is not None:
            entity.settle(token, status, reason, description)
        self.confirm(event.delivery)

    @staticmethod
    def confirm(delivery):
        """Settles with the outcome the receiver chose (it waits for it in
        receiver-settle-mode second)."""
        if not delivery.settled:
            if delivery.remote_state:
                delivery.update(delivery.remote_state)
            delivery.settle()

    def on_accepted(self, event):
        self.settled_by_peer(event, "completed")

    def on_rejected(self, event):
        condition = event.delivery.remote.condition
        info = (condition.info if condition else None) or {}
        reason = info.get("DeadLetterReason") or info.get(symbol("DeadLetterReason"))
        description = info.get("DeadLetterErrorDescription") or info.get(
            symbol("DeadLetterErrorDescription")
        )
        self.settled_by_peer(event, "suspended", reason, description)

    def on_released(self, event):
        # Modified with undeliverable-here is a defer; any other modified or released
        # outcome is an abandon, which the service counts as a delivery.
        remote = event.delivery.remote
        if event.delivery.remote_state == Disposition.MODIFIED and remote.undeliverable:
            self.settled_by_peer(event, "defered")
        else:
            self.settled_by_peer(event, "abandoned")


# ---------------------------------------------------------------------------------
# The ATOM management API (what ServiceBusAdministrationClient speaks), over HTTPS
# with a self-signed certificate: queues, topics, subscriptions and rules.


ATOM = "http://www.w3.org/2005/Atom"
SB = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
SB_MESSAGING = "http://schemas.microsoft.com/netservices/2011/06/servicebus"
QUEUE_FIELDS = {
    "LockDuration": "LockDuration",
    "MaxDeliveryCount": "MaxDeliveryCount",
    "RequiresSession": "RequiresSession",
    "RequiresDuplicateDetection": "RequiresDuplicateDetection",
    "DuplicateDetectionHistoryTimeWindow": "DuplicateDetectionHistoryTimeWindow",
}


def description_of(body):
    """(kind, {field: text}, element) of an ATOM entry's description."""
    root = ET.fromstring(body)
    content = root.find("{%s}content" % ATOM)
    if content is None or len(content) == 0:
        raise ValueError("the entry has no content")
    element = content[0]
    kind = element.tag.split("}")[-1]
    fields = {child.tag.split("}")[-1]: (child.text or "") for child in element}
    return kind, fields, element


def as_bool(text):
    return str(text).strip().lower() == "true"


def entity_props(fields):
    props = {}
    if fields.get("LockDuration"):
        props["LockDuration"] = fields["LockDuration"]
    if fields.get("MaxDeliveryCount"):
        props["MaxDeliveryCount"] = int(fields["MaxDeliveryCount"])
    for flag in ("RequiresSession", "RequiresDuplicateDetection"):
        if flag in fields:
            props[flag] = as_bool(fields[flag])
    if fields.get("DuplicateDetectionHistoryTimeWindow"):
        props["DuplicateDetectionHistoryTimeWindow"] = fields["DuplicateDetectionHistoryTimeWindow"]
    if "UserMetadata" in fields:
        props["UserMetadata"] = fields["UserMetadata"]
    return props


def rule_of(name, element):
    """A Rule from a RuleDescription element (SqlFilter, CorrelationFilter, TrueFilter,
    FalseFilter)."""
    flt = element.find("{%s}Filter" % SB)
    kind = (flt.get("{%s}type" % XSI) if flt is not None else "TrueFilter") or "TrueFilter"
    if kind in ("TrueFilter", "FalseFilter"):
        expr = "1=1" if kind == "TrueFilter" else "1=0"
        return Rule(name, {"FilterType": "Sql", "SqlFilter": {"SqlExpression": expr}})
    if kind == "SqlFilter":
        expr = flt.findtext("{%s}SqlExpression" % SB) or "1=1"
        return Rule(name, {"FilterType": "Sql", "SqlFilter": {"SqlExpression": expr}})
    corr = {}
    for key in ("CorrelationId", "MessageId", "To", "ReplyTo", "Label", "SessionId", "ContentType"):
        value = flt.findtext("{%s}%s" % (SB, key))
        if value:
            corr[key] = value
    props = {}
    for kv in flt.iter("{%s}KeyValueOfstringanyType" % SB):
        key = kv.findtext("{%s}Key" % SB)
        value_el = kv.find("{%s}Value" % SB)
        value = value_el.text if value_el is not None else None
        vtype = (value_el.get("{%s}type" % XSI) or "") if value_el is not None else ""
        if vtype.endswith("int") or vtype.endswith("long"):
            value = int(value)
        elif vtype.endswith("double"):
            value = float(value)
        elif vtype.endswith("boolean"):
            value = as_bool(value)
        props[key] = value
    if props:
        corr["Properties"] = props
    return Rule(name, {"FilterType": "Correlation", "CorrelationFilter": corr})


def rule_description(rule):
    """The body of a RuleDescription as the service writes it: a TrueFilter (for
    1=1), a SqlFilter or a CorrelationFilter with its application properties."""
    esc = xml.sax.saxutils.escape
    if rule.sql is not None:
        if rule.sql.text.strip() == "1=1":
            flt = '<Filter i:type="TrueFilter"><SqlExpression>1=1</SqlExpression></Filter>'
        else:
            flt = '<Filter i:type="SqlFilter"><SqlExpression>{}</SqlExpression></Filter>'.format(
                esc(rule.sql.text))
    else:
        corr = rule.correlation or {}
        fixed = "".join("<{0}>{1}</{0}>".format(k, esc(str(v)))
                        for k, v in corr.items() if k != "Properties")
        pairs = "".join(
            '<KeyValueOfstringanyType><Key>{}</Key><Value i:type="d6p1:string" '
            'xmlns:d6p1="http://www.w3.org/2001/XMLSchema">{}</Value></KeyValueOfstringanyType>'
            .format(esc(str(k)), esc(str(v)))
            for k, v in (corr.get("Properties") or {}).items())
        flt = '<Filter i:type="CorrelationFilter">{}<Properties>{}</Properties></Filter>'.format(
            fixed, pairs)
    return '{}<Action i:type="EmptyRuleAction"/><Name>{}</Name>'.format(flt, esc(rule.name))


def entry_xml(base, path, kind, fields, inner=None):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = inner if inner is not None else "".join(
        ('<CountDetails xmlns:d2p1="{}">{}</CountDetails>'.format(SB_MESSAGING, v)
         if k == "CountDetails" else "<{0}>{1}</{0}>".format(k, v))
        for k, v in fields.items())
    return (
        '<entry xmlns="{atom}"><id>{base}/{path}</id><title type="text">{title}</title>'
        "<published>{now}</published><updated>{now}</updated>"
        '<content type="application/xml"><{kind} xmlns="{sb}" xmlns:i="{xsi}">{body}</{kind}>'
        "</content></entry>"
    ).format(atom=ATOM, base=base, path=path, title=path.split("/")[-1], now=now, kind=kind,
             sb=SB, xsi=XSI, body=body).encode()


def entity_fields(entity):
    active = len(entity.ready) + len(entity.locked) + len(entity.deferred)
    return {
        "LockDuration": "PT{}S".format(int(entity.lock_seconds)),
        "RequiresDuplicateDetection": str(entity.duplicate_detection).lower(),
        "RequiresSession": str(entity.requires_session).lower(),
        "DuplicateDetectionHistoryTimeWindow": "PT{}S".format(int(entity.duplicate_window)),
        "MaxDeliveryCount": str(entity.max_delivery_count),
        "UserMetadata": xml.sax.saxutils.escape(entity.user_metadata),
        # As the service writes them: the messages still in the entity (ready, locked
        # or deferred), its dead letters and its scheduled messages apart.
        "MessageCount": str(active + len(entity.dlq.ready) + len(entity.scheduled)),
        "CountDetails": (
            '<d2p1:ActiveMessageCount>{}</d2p1:ActiveMessageCount>'
            '<d2p1:DeadLetterMessageCount>{}</d2p1:DeadLetterMessageCount>'
            '<d2p1:ScheduledMessageCount>{}</d2p1:ScheduledMessageCount>'
            '<d2p1:TransferMessageCount>0</d2p1:TransferMessageCount>'
            '<d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount>'
        ).format(active, len(entity.dlq.ready), len(entity.scheduled)),
    }


class Management(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    broker = None
    base = ""

    def log_message(self, fmt, *args):
        log("management:", fmt % args)

    def reply(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-type", "application/atom+xml;type=entry;charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, message):
        body = "<Error><Code>{}</Code><Detail>{}</Detail></Error>".format(status, message)
        self.reply(status, body.encode())

    def path_parts(self):
        path = urllib.parse.urlparse(self.path).path
        return [urllib.parse.unquote(p) for p in path.split("/") if p]

    def refused(self):
        """Answers 401 (with the reason) unless the Authorization header holds a valid
        SAS token or `Bearer <jwt>`; says whether it did."""
        header = self.headers.get("Authorization") or ""
        if header.startswith("Bearer "):
            header = header[len("Bearer "):]
        refusal = access_refusal(header)
        if refusal is not None:
            self.error(401, "Unauthorized: " + refusal)
        return refusal is not None

    def do_GET(self):
        if self.refused():
            return
        parts = self.path_parts()
        b = self.broker
        with b.lock:
            if len(parts) == 1 and parts[0].lower() in b.queues:
                q = b.queues[parts[0].lower()]
                return self.reply(200, entry_xml(self.base, parts[0], "QueueDescription",
                                                 entity_fields(q)))
            if len(parts) == 1 and parts[0].lower() in b.topics:
                t = b.topics[parts[0].lower()]
                return self.reply(200, entry_xml(self.base, parts[0], "TopicDescription", {
                    "RequiresDuplicateDetection": str(t.duplicate_detection).lower()}))
            if len(parts) == 3 and parts[1].lower() == "subscriptions":
                t = b.topics.get(parts[0].lower())
                sub = t and t.subscriptions.get(parts[2].lower())
                if sub:
                    return self.reply(200, entry_xml(self.base, "/".join(parts),
                                                     "SubscriptionDescription",
                                                     entity_fields(sub[0])))
            if (len(parts) == 5 and parts[1].lower() == "subscriptions"
                    and parts[3].lower() == "rules"):
                t = b.topics.get(parts[0].lower())
                sub = t and t.subscriptions.get(parts[2].lower())
                rule = sub and sub[1].get(parts[4])
                if rule:
                    return self.reply(200, entry_xml(self.base, "/".join(parts),
                                                     "RuleDescription", {},
                                                     inner=rule_description(rule)))
        return self.error(404, "entity {} not found".format("/".join(parts)))

    def do_DELETE(self):
        if self.refused():
            return
        parts = self.path_parts()
        b = self.broker
        with b.lock:
            if len(parts) == 1 and b.queues.pop(parts[0].lower(), None) is not None:
                return self.reply(200)
            if len(parts) == 1 and b.topics.pop(parts[0].lower(), None) is not None:
                return self.reply(200)
            t = b.topics.get(parts[0].lower()) if parts else None
            if t and len(parts) == 3 and t.subscriptions.pop(parts[2].lower(), None):
                return self.reply(200)
            if t and len(parts) == 5 and parts[3].lower() == "rules":
                sub = t.subscriptions.get(parts[2].lower())
                if sub and sub[1].pop(parts[4], None) is not None:
                    return self.reply(200)
        return self.error(404, "entity {} not found".format("/".join(parts)))

    def do_PUT(self):
        if self.refused():
            return
        parts = self.path_parts()
        length = int(self.headers.get("content-length") or 0)
        try:
            kind, fields, element = description_of(self.rfile.read(length))
        except (ValueError, ET.ParseError) as e:
            return self.error(400, "unreadable entry: {}".format(e))
        update = self.headers.get("If-Match") == "*"
        b = self.broker
        path = "/".join(parts)
        with b.lock:
            if kind == "QueueDescription" and len(parts) == 1:
                key = parts[0].lower()
                if (key in b.queues or key in b.topics) and not update:
                    return self.error(409, "entity {} already exists".format(path))
                if update and key in b.queues:
                    # An update changes the properties and keeps the messages.
                    b.queues[key].configure(entity_props(fields))
                else:
                    b.queues[key] = Entity(parts[0], entity_props(fields), b)
                return self.reply(200 if update else 201, entry_xml(
                    self.base, path, kind, entity_fields(b.queues[key])))
            if kind == "TopicDescription" and len(parts) == 1:
                key = parts[0].lower()
                if (key in b.queues or key in b.topics) and not update:
                    return self.error(409, "entity {} already exists".format(path))
                old = b.topics.get(key)
                topic = Topic(parts[0], entity_props(fields), b)
                if old is not None:
                    topic.subscriptions = old.subscriptions
                b.topics[key] = topic
                return self.reply(200 if update else 201, entry_xml(
                    self.base, path, kind, {"RequiresDuplicateDetection":
                                            str(topic.duplicate_detection).lower()}))
            if kind == "SubscriptionDescription" and len(parts) == 3:
                topic = b.topics.get(parts[0].lower())
                if topic is None:
                    return self.error(404, "topic {} not found".format(parts[0]))
                key = parts[2].lower()
                if key in topic.subscriptions and not update:
                    return self.error(409, "entity {} already exists".format(path))
                if update and key in topic.subscriptions:
                    # An update changes the properties and keeps the messages.
                    entity = topic.subscriptions[key][0]
                    entity.configure(entity_props(fields))
                else:
                    entity = Entity("{}/Subscriptions/{}".format(parts[0], parts[2]),
                                    entity_props(fields), b)
                rules = topic.subscriptions[key][1] if key in topic.subscriptions else {
                    "$Default": Rule("$Default", {"FilterType": "Sql",
                                                  "SqlFilter": {"SqlExpression": "1=1"}})}
                default_rule = element.find("{%s}DefaultRuleDescription" % SB)
                if default_rule is not None and not update:
                    rules = {"$Default": rule_of("$Default", default_rule)}
                topic.subscriptions[key] = (entity, rules)
                return self.reply(200 if update else 201, entry_xml(
                    self.base, path, kind, entity_fields(entity)))
            if kind == "RuleDescription" and len(parts) == 5:
                topic = b.topics.get(parts[0].lower())
                sub = topic and topic.subscriptions.get(parts[2].lower())
                if not sub:
                    return self.error(404, "subscription {} not found".format(path))
                if parts[4] in sub[1] and not update:
                    return self.error(409, "rule {} already exists".format(path))
                try:
                    sub[1][parts[4]] = rule_of(parts[4], element)
                except ValueError as e:
                    return self.error(400, "invalid filter: {}".format(e))
                # The rule as it was given (clients read its filter back).
                inner = "".join(ET.tostring(child, encoding="unicode") for child in element)
                return self.reply(200 if update else 201, entry_xml(
                    self.base, path, kind, {}, inner=inner))
        return self.error(400, "cannot PUT a {} at {}".format(kind, path))


def serve_management(broker, host, port):
    """Serves the management API on HTTPS with a throwaway self-signed certificate."""
    folder = tempfile.mkdtemp(prefix="servicebus-emulator-")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
         "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer((host, port), Management)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    Management.broker = broker
    Management.base = "https://{}:{}".format(host, server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--config", required=True)
    parser.add_argument("--key-name", default="RootManageSharedAccessKey")
    parser.add_argument("--key", default="SAS_KEY_VALUE")
    parser.add_argument("--token-key", default=TOKEN_KEY["key"],
                        help="the HS256 key of trusted bearer tokens (Entra ID's stand-in)")
    parser.add_argument("--management-port", type=int, default=None,
                        help="HTTPS port of the ATOM management API (default: AMQP port + 1)")
    args = parser.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    broker = Broker(config)
    management_port = serve_management(
        broker, args.host, args.management_port if args.management_port is not None
        else (args.port + 1 if args.port else 0))
    print("SERVICEBUS_MANAGEMENT_ENDPOINT=https://{}:{}".format(args.host, management_port),
          flush=True)
    KEYS.clear()
    KEYS[args.key_name] = args.key
    TOKEN_KEY["key"] = args.token_key
    print(
        "SERVICEBUS_CONNECTION_STRING=Endpoint=sb://{}:{};SharedAccessKeyName={};"
        "SharedAccessKey={};UseDevelopmentEmulator=true;".format(
            args.host, args.port, args.key_name, args.key
        ),
        flush=True,
    )
    Container(Handler(broker, "{}:{}".format(args.host, args.port))).run()


if __name__ == "__main__":
    main()
