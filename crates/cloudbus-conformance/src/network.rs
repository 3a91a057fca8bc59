//! A TCP fault proxy for the providers' network-fault tests: it forwards connections
//! to an emulator and, on command or at random moments, severs every open connection,
//! stalls them, or adds latency, so that the SDK meets what a real network does; and
//! [`nothing_lost_through`], the case every provider runs through it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// What the proxy did, for the report.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Times every open connection was severed.
    pub severs: AtomicU64,
    /// Connections severed, over all severs.
    pub severed_connections: AtomicU64,
    /// Spells during which every connection stalled.
    pub stalls: AtomicU64,
    /// Spells of added latency.
    pub latency_spells: AtomicU64,
}

impl FaultCounts {
    /// The counts as one `name=value` line.
    pub fn summary(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "connections={} severs={} severed_connections={} stalls={} latency_spells={}",
            l(&self.connections),
            l(&self.severs),
            l(&self.severed_connections),
            l(&self.stalls),
            l(&self.latency_spells)
        )
    }
}

struct State {
    target: SocketAddr,
    open: Mutex<Vec<AbortHandle>>,
    stalled: AtomicBool,
    latency_ms: AtomicU64,
    counts: FaultCounts,
}

/// A running proxy; dropping it stops accepting (open connections live on until
/// severed or closed).
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    acceptor: AbortHandle,
    chaos: Mutex<Option<AbortHandle>>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        if let Some(c) = self.chaos.lock().unwrap().take() {
            c.abort();
        }
        self.sever_all();
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            target,
            open: Mutex::new(Vec::new()),
            stalled: AtomicBool::new(false),
            latency_ms: AtomicU64::new(0),
            counts: FaultCounts::default(),
        });
        let s = state.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.counts.connections.fetch_add(1, Ordering::Relaxed);
                let conn = tokio::spawn(forward(client, s.clone()));
                let mut open = s.open.lock().unwrap();
                open.retain(|h| !h.is_finished());
                open.push(conn.abort_handle());
            }
        })
        .abort_handle();
        FaultProxy {
            addr,
            state,
            acceptor,
            chaos: Mutex::new(None),
        }
    }

    /// `host:port` of the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> &FaultCounts {
        &self.state.counts
    }

    /// Closes every open connection at once (both sides see the socket drop).
    pub fn sever_all(&self) {
        let open: Vec<AbortHandle> = std::mem::take(&mut *self.state.open.lock().unwrap());
        self.state.counts.severs.fetch_add(1, Ordering::Relaxed);
        for conn in open {
            if !conn.is_finished() {
                self.state
                    .counts
                    .severed_connections
                    .fetch_add(1, Ordering::Relaxed);
            }
            conn.abort();
        }
    }

    /// Stops (or resumes) forwarding bytes on every connection.
    pub fn stall(&self, stalled: bool) {
        if stalled {
            self.state.counts.stalls.fetch_add(1, Ordering::Relaxed);
        }
        self.state.stalled.store(stalled, Ordering::Relaxed);
    }

    /// Delays every forwarded chunk by `latency`.
    pub fn latency(&self, latency: Duration) {
        if !latency.is_zero() {
            self.state
                .counts
                .latency_spells
                .fetch_add(1, Ordering::Relaxed);
        }
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// From now on, every `every_ms` (a random span in that range) one fault: mostly
    /// severing all connections, sometimes a stall of up to a second or a spell of
    /// latency. [`calm`](Self::calm) ends it.
    pub fn start_chaos(self: &Arc<Self>, seed: u64, every_ms: std::ops::Range<u64>) {
        let proxy = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            loop {
                tokio::time::sleep(Duration::from_millis(rng.u64(every_ms.clone()))).await;
                let Some(p) = proxy.upgrade() else { return };
                match rng.u8(..10) {
                    0..=6 => p.sever_all(),
                    7 | 8 => {
                        p.stall(true);
                        tokio::time::sleep(Duration::from_millis(rng.u64(100..1000))).await;
                        p.stall(false);
                    }
                    _ => {
                        p.latency(Duration::from_millis(rng.u64(10..80)));
                        tokio::time::sleep(Duration::from_millis(rng.u64(200..1000))).await;
                        p.latency(Duration::ZERO);
                    }
                }
            }
        });
        *self.chaos.lock().unwrap() = Some(task.abort_handle());
    }

    /// Ends the random faults; the network is healthy again.
    pub fn calm(&self) {
        if let Some(c) = self.chaos.lock().unwrap().take() {
            c.abort();
        }
        self.stall(false);
        self.latency(Duration::ZERO);
    }
}

async fn forward(client: TcpStream, state: Arc<State>) {
    let Ok(upstream) = TcpStream::connect(state.target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let s1 = state.clone();
    let up = async move { pump(&mut cr, &mut uw, &s1).await };
    let down = async move { pump(&mut ur, &mut cw, &state).await };
    tokio::select! {
        _ = up => {},
        _ = down => {},
    }
}

async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    state: &State,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while state.stalled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let latency = state.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The report line of a network-fault run.
#[derive(Debug, Default)]
pub struct NetReport {
    /// Events published (each accepted in the end).
    pub published: usize,
    /// Publishes that failed and were made again.
    pub publish_retries: usize,
    /// Published events the handler saw.
    pub received: usize,
    /// Deliveries beyond the first of an event.
    pub duplicates: usize,
    /// Published events the handler never saw.
    pub lost: usize,
    /// Events the worker dead-lettered.
    pub dead_lettered: u64,
}

/// Publishes `count` events to `topic` on `bus` (whose connections go through
/// `proxy`) while the proxy injects faults, handles them with a worker whose handler
/// always succeeds, and reports. A publish that fails is published again (the same
/// event, so the same id): the promise is about accepted events, and the test wants
/// all of them accepted. Panics when the run does not end within `deadline` (a hang).
pub async fn nothing_lost_through(
    proxy: Arc<FaultProxy>,
    bus: cloudbus_core::Bus,
    topic: &str,
    subscription: &str,
    count: usize,
    deadline: Duration,
) -> NetReport {
    let label = format!("{}://{topic}", bus.scheme());
    let run = async {
        use cloudbus_core::AttributesReader;
        let seed = fastrand::u64(..);
        proxy.start_chaos(seed, 300..700);
        let publisher = bus.publisher(topic).await.expect("publisher");
        let events: Vec<cloudbus_core::Event> = (0..count)
            .map(|i| {
                cloudbus_core::EventBuilder::new("com.example.netfault", "/tests/netfault")
                    .subject(i.to_string())
                    .build()
                    .expect("event")
            })
            .collect();
        let mut todo: Vec<cloudbus_core::Event> = events.clone();
        let mut publish_retries = 0;
        for round in 0..40 {
            let handles: Vec<_> = todo
                .iter()
                .map(|e| (e.clone(), publisher.publish(e.clone())))
                .collect();
            let mut failed = Vec::new();
            for (e, h) in handles {
                if h.await.is_err() {
                    failed.push(e);
                }
            }
            if failed.is_empty() {
                break;
            }
            assert!(
                round < 39,
                "{label}: {} events never accepted",
                failed.len()
            );
            publish_retries += failed.len();
            tokio::time::sleep(Duration::from_millis(500)).await;
            todo = failed;
        }
        let consumer = bus.consumer(topic, subscription).await.expect("consumer");
        let seen: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let s2 = seen.clone();
        let worker = consumer
            .start_worker(
                move |e: Arc<cloudbus_core::Event>, _c: cloudbus_core::HandlerContext| {
                    let seen = s2.clone();
                    async move {
                        *seen.lock().unwrap().entry(e.id().to_owned()).or_default() += 1;
                        Ok::<(), cloudbus_core::HandlerError>(())
                    }
                },
                cloudbus_core::WorkerOptions::default()
                    .concurrency(32)
                    .receive_wait(Duration::from_millis(500)),
            )
            .expect("a plain handler needs no wiring");
        let handled = || seen.lock().unwrap().len();
        let (mut last, mut progress_at) = (0, std::time::Instant::now());
        let mut calm_at = None;
        loop {
            let now = handled();
            if now >= count {
                break;
            }
            if now > last {
                (last, progress_at) = (now, std::time::Instant::now());
            }
            // Stragglers come back when their leases run out: give the network a calm
            // spell once progress stops, then give up after another stall window.
            if progress_at.elapsed() > Duration::from_secs(30) {
                if calm_at.is_none() {
                    proxy.calm();
                    calm_at = Some(std::time::Instant::now());
                    progress_at = std::time::Instant::now();
                } else {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        proxy.calm();
        let report = worker.shutdown(Duration::from_secs(30)).await;
        let seen = seen.lock().unwrap().clone();
        let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id()).collect();
        let received = ids.iter().filter(|id| seen.contains_key(**id)).count();
        let net = NetReport {
            published: count,
            publish_retries,
            received,
            duplicates: seen.values().map(|n| n - 1).sum(),
            lost: count - received,
            dead_lettered: report.dead_lettered,
        };
        eprintln!(
            "NETFAULT {label} seed={seed} published={} publish_retries={} received={} duplicates={} lost={} dead_lettered={} | {}",
            net.published,
            net.publish_retries,
            net.received,
            net.duplicates,
            net.lost,
            net.dead_lettered,
            proxy.counts().summary()
        );
        net
    };
    match tokio::time::timeout(deadline, run).await {
        Ok(report) => report,
        Err(_) => panic!("{label}: the run did not end within {deadline:?} (a hang)"),
    }
}
