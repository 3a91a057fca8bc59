//! The state of one subscription: ready messages, delayed ones, leases in flight,
//! ordering-key lanes and the dead-letter list. All methods run under the
//! subscription's lock and never await.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cloudbus_driver::{
    DeadLetter, Error, ErrorKind, Payload, Result, Settlement, SubscriptionSpec,
};

/// One message as the subscription keeps it.
#[derive(Clone, Debug)]
pub(crate) struct Msg {
    pub payload: Payload,
    pub size: usize,
    pub key: Option<Arc<str>>,
    /// Deliveries so far.
    pub attempts: u32,
    pub not_before: Option<Instant>,
    /// The message at the head of its ordering-key lane (the only one of its key that
    /// may be ready, delayed for redelivery or in flight).
    pub is_head: bool,
    pub seq: u64,
    pub published_at: DateTime<Utc>,
}

struct Delayed(Instant, u64, Msg);

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 && self.1 == other.1
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    // Reversed: BinaryHeap is a max-heap and we want the earliest due first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.0, other.1).cmp(&(self.0, self.1))
    }
}

/// Tokens are sequential integers: a multiplicative hash spreads them well at a
/// fraction of SipHash's cost (the map is touched twice per message).
#[derive(Default, Clone, Copy)]
pub(crate) struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type TokenMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<TokenHasher>>;

struct InFlight {
    msg: Msg,
    deadline: Instant,
}

pub(crate) struct DeadEntry {
    msg: Msg,
    reason: String,
    description: String,
    at: DateTime<Utc>,
}

/// A message handed out by [`SubState::take`].
pub(crate) struct Taken {
    pub token: u64,
    pub payload: Payload,
    pub attempt: u32,
    pub key: Option<Arc<str>>,
    pub size: usize,
    pub published_at: DateTime<Utc>,
}

/// Limits of one subscription.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub max_dead_letters: usize,
}

pub(crate) struct SubState {
    pub spec: SubscriptionSpec,
    pub limits: Limits,
    ready: VecDeque<Msg>,
    delayed: BinaryHeap<Delayed>,
    inflight: TokenMap<InFlight>,
    lanes: HashMap<Arc<str>, VecDeque<Msg>>,
    dead: VecDeque<DeadEntry>,
    next_token: u64,
    /// Publish order, the tie-breaker between messages due at the same instant.
    next_seq: u64,
    /// Messages held (ready, delayed, pending in lanes, in flight), not dead letters.
    count: usize,
    bytes: usize,
    last_scan: Instant,
    pub deleted: bool,
}

impl SubState {
    pub fn new(spec: SubscriptionSpec, limits: Limits) -> Self {
        SubState {
            spec,
            limits,
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            inflight: TokenMap::default(),
            lanes: HashMap::new(),
            dead: VecDeque::new(),
            next_token: 1,
            next_seq: 0,
            count: 0,
            bytes: 0,
            last_scan: Instant::now(),
            deleted: false,
        }
    }

    fn scan_interval(&self) -> Duration {
        (self.spec.lease / 10).clamp(Duration::from_millis(5), Duration::from_millis(250))
    }

    /// Whether `n` more messages of `bytes` fit.
    pub fn has_room(&self, n: usize, bytes: usize) -> bool {
        self.count + n <= self.limits.max_messages && self.bytes + bytes <= self.limits.max_bytes
    }

    pub fn depth(&self) -> usize {
        self.count
    }

    /// Adds a newly published message; returns whether one became ready.
    pub fn publish(&mut self, mut msg: Msg, now: Instant) -> bool {
        msg.seq = self.next_seq;
        self.next_seq += 1;
        self.count += 1;
        self.bytes += msg.size;
        if let Some(due) = msg.not_before.filter(|d| *d > now) {
            msg.is_head = false;
            let seq = msg.seq;
            self.delayed.push(Delayed(due, seq, msg));
            return false;
        }
        self.make_available(msg, now)
    }

    /// A message that may be delivered now, subject to its ordering lane.
    fn make_available(&mut self, mut msg: Msg, now: Instant) -> bool {
        if msg.is_head {
            return self.ready_or_delay(msg, now);
        }
        if let (Some(key), true) = (msg.key.clone(), self.spec.ordered) {
            if let Some(pending) = self.lanes.get_mut(&key) {
                pending.push_back(msg);
                return false;
            }
            self.lanes.insert(key, VecDeque::new());
            msg.is_head = true;
        }
        self.ready_or_delay(msg, now)
    }

    fn ready_or_delay(&mut self, msg: Msg, now: Instant) -> bool {
        match msg.not_before.filter(|d| *d > now) {
            Some(due) => {
                let seq = msg.seq;
                self.delayed.push(Delayed(due, seq, msg));
                false
            }
            None => {
                self.ready.push_back(msg);
                true
            }
        }
    }

    /// The head of `key`'s lane is finished: the next of that key may go.
    fn release_lane(&mut self, key: &Option<Arc<str>>, was_head: bool, now: Instant) -> bool {
        let Some(key) = key else { return false };
        if !was_head {
            return false;
        }
        let next = match self.lanes.get_mut(key) {
            Some(pending) => pending.pop_front(),
            None => return false,
        };
        match next {
            Some(mut next) => {
                next.is_head = true;
                self.ready_or_delay(next, now)
            }
            None => {
                self.lanes.remove(key);
                false
            }
        }
    }

    /// Promotes due delayed messages and expires leases; returns whether any became ready.
    fn maintain(&mut self, now: Instant) -> bool {
        let mut woke = false;
        while self.delayed.peek().is_some_and(|d| d.0 <= now) {
            if let Some(Delayed(_, _, mut msg)) = self.delayed.pop() {
                msg.not_before = None;
                woke |= self.make_available(msg, now);
            }
        }
        if !self.inflight.is_empty() && now >= self.last_scan + self.scan_interval() {
            self.last_scan = now;
            let expired: Vec<u64> = self
                .inflight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            for token in expired {
                if let Some(f) = self.inflight.remove(&token) {
                    woke |= self.redeliver(f.msg, Duration::ZERO, now, "lease expired");
                }
            }
        }
        woke
    }

    /// When something may change without a publish (a delay due, a lease to expire).
    pub fn next_wake(&self) -> Option<Instant> {
        let delayed = self.delayed.peek().map(|d| d.0);
        let scan = (!self.inflight.is_empty()).then(|| self.last_scan + self.scan_interval());
        match (delayed, scan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Hands out up to `max` ready messages with fresh leases.
    pub fn take(&mut self, max: usize, now: Instant) -> Vec<Taken> {
        self.maintain(now);
        let n = max.min(self.ready.len());
        let mut out = Vec::with_capacity(n);
        let deadline = now + self.spec.lease;
        for mut msg in self.ready.drain(..n) {
            msg.attempts += 1;
            let token = self.next_token;
            self.next_token += 1;
            out.push(Taken {
                token,
                payload: msg.payload.clone(),
                attempt: msg.attempts,
                key: msg.key.clone(),
                size: msg.size,
                published_at: msg.published_at,
            });
            self.inflight.insert(token, InFlight { msg, deadline });
        }
        out
    }

    /// Settles one token; returns whether a message became ready.
    pub fn settle(&mut self, token: u64, settlement: &Settlement, now: Instant) -> Result<bool> {
        let Some(mut flight) = self.inflight.remove(&token) else {
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                "unknown delivery: its lease expired or it was settled already",
            ));
        };
        if flight.deadline <= now {
            // Expired but not yet scanned: it belongs to the next delivery now.
            let woke = self.redeliver(flight.msg, Duration::ZERO, now, "lease expired");
            let _ = woke;
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                "the lease expired before settlement; the message will be delivered again",
            ));
        }
        Ok(match settlement {
            Settlement::Ack => self.remove(flight.msg, now),
            Settlement::Nack { delay } => self.redeliver(flight.msg, *delay, now, "nacked"),
            Settlement::DeadLetter {
                reason,
                description,
            } => match self.dead_letter(flight.msg, reason.clone(), description.clone(), now) {
                Ok(woke) => woke,
                Err(refused) => {
                    let (msg, e) = *refused;
                    // The dead-letter list is full: keep the message in flight.
                    self.inflight.insert(
                        token,
                        InFlight {
                            msg,
                            deadline: flight.deadline,
                        },
                    );
                    return Err(e);
                }
            },
            Settlement::Extend { lease } => {
                flight.deadline = now + *lease;
                self.inflight.insert(token, flight);
                false
            }
        })
    }

    fn remove(&mut self, msg: Msg, now: Instant) -> bool {
        self.count -= 1;
        self.bytes -= msg.size;
        self.release_lane(&msg.key, msg.is_head, now)
    }

    /// Back for another delivery, unless it is out of attempts (then dead-lettered).
    fn redeliver(&mut self, mut msg: Msg, delay: Duration, now: Instant, why: &str) -> bool {
        if let Some(max) = self.spec.max_delivery_attempts
            && msg.attempts >= max
        {
            let reason = format!("max delivery attempts ({max}) exceeded");
            return match self.dead_letter(msg, reason, format!("last delivery {why}"), now) {
                Ok(woke) => woke,
                Err(refused) => {
                    self.ready.push_front(refused.0);
                    true
                }
            };
        }
        if delay.is_zero() {
            msg.not_before = None;
            self.ready.push_front(msg);
            true
        } else {
            let due = now + delay;
            msg.not_before = Some(due);
            let seq = msg.seq;
            self.delayed.push(Delayed(due, seq, msg));
            false
        }
    }

    fn dead_letter(
        &mut self,
        msg: Msg,
        reason: String,
        description: String,
        now: Instant,
    ) -> std::result::Result<bool, Box<(Msg, Error)>> {
        if self.dead.len() >= self.limits.max_dead_letters {
            return Err(Box::new((
                msg,
                Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "the dead-letter list holds its maximum of {} messages",
                        self.limits.max_dead_letters
                    ),
                ),
            )));
        }
        self.count -= 1;
        self.bytes -= msg.size;
        let woke = self.release_lane(&msg.key, msg.is_head, now);
        self.dead.push_back(DeadEntry {
            msg,
            reason,
            description,
            at: Utc::now(),
        });
        Ok(woke)
    }

    pub fn peek_dead(&self, max: usize, source: &str) -> Vec<DeadLetter> {
        self.dead
            .iter()
            .take(max)
            .map(|d| DeadLetter {
                payload: d.msg.payload.clone(),
                reason: Some(d.reason.clone()),
                description: (!d.description.is_empty()).then(|| d.description.clone()),
                source_entity: Some(source.to_owned()),
                attempts: d.msg.attempts,
                dead_lettered_at: Some(d.at),
            })
            .collect()
    }

    /// Moves dead letters back for delivery (attempts reset); stops when full.
    pub fn redrive(&mut self, max: Option<usize>, now: Instant) -> Result<(usize, bool)> {
        let limit = max.unwrap_or(usize::MAX);
        let mut moved = 0;
        let mut woke = false;
        while moved < limit {
            let Some(front) = self.dead.front() else {
                break;
            };
            if !self.has_room(1, front.msg.size) {
                if moved == 0 {
                    return Err(Error::new(
                        ErrorKind::ResourceExhausted,
                        "the subscription is full; nothing redriven",
                    ));
                }
                break;
            }
            let Some(entry) = self.dead.pop_front() else {
                break;
            };
            let mut msg = entry.msg;
            msg.attempts = 0;
            msg.is_head = false;
            msg.not_before = None;
            self.count += 1;
            self.bytes += msg.size;
            woke |= self.make_available(msg, now);
            moved += 1;
        }
        Ok((moved, woke))
    }

    /// Deletes up to `max` dead letters (all when `None`), oldest first.
    pub fn purge_dead(&mut self, max: Option<usize>) -> usize {
        let n = max.map_or(self.dead.len(), |m| m.min(self.dead.len()));
        self.dead.drain(..n);
        n
    }
}
