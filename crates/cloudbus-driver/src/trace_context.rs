//! The W3C trace context (`traceparent`) an event carries, and the one of the task
//! handling an event: parsed, formatted and continued here, with nothing else of
//! cloudbus below it, so that the envelope and telemetry both build on it.

use std::fmt;

/// A W3C trace context (`traceparent`): trace id, parent span id and flags.
///
/// ```
/// use cloudbus_driver::TraceContext;
/// let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
/// let ctx = TraceContext::parse(tp).unwrap();
/// assert_eq!(ctx.to_string(), tp);
/// let child = ctx.child();
/// assert_eq!(child.trace_id(), ctx.trace_id());
/// assert_ne!(child.span_id(), ctx.span_id());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// A new trace (random ids, sampled).
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: 1,
        }
    }
    /// A context from its parts (an OpenTelemetry span's, with feature `otel`).
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) fn from_parts(trace_id: u128, span_id: u64, flags: u8) -> Self {
        TraceContext {
            trace_id,
            span_id,
            flags,
        }
    }
    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }
    /// Parses a version-00 `traceparent`; `None` when it is not valid.
    pub fn parse(s: &str) -> Option<Self> {
        // Fixed layout: "00-" 32 hex "-" 16 hex "-" 2 hex, lowercase (read for every
        // published and handled event, so no splitting or trimming).
        let b = s.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id =
            (u128::from(hex_digits(&b[3..19])?) << 64) | u128::from(hex_digits(&b[19..35])?);
        let span_id = hex_digits(&b[36..52])?;
        let flags = u8::try_from(hex_digits(&b[53..55])?).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }
    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }
    /// The context of the task currently handling an event, if any.
    pub fn current() -> Option<Self> {
        CURRENT_TRACE.try_with(|c| *c).ok()
    }
    /// Runs `fut` with `self` as the current context.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CURRENT_TRACE.scope(self, fut).await
    }
}

/// The value of each lowercase hex digit; `0x80` marks every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut table = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// Up to 16 lowercase hex digits as a number; `None` on any other byte. Branch-free
/// per digit: `traceparent` is read for every published and handled event.
fn hex_digits(digits: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    let mut invalid = 0u8;
    for &d in digits {
        let n = HEX_VALUE[usize::from(d)];
        invalid |= n;
        value = (value << 4) | u64::from(n & 0x0f);
    }
    (invalid & 0x80 == 0).then_some(value)
}

impl TraceContext {
    /// The `traceparent` text, built without the formatting machinery (it is made for
    /// every published event).
    pub fn to_traceparent(&self) -> String {
        fn hex(out: &mut String, value: u128, digits: u32) {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for i in (0..digits).rev() {
                out.push(HEX[((value >> (i * 4)) & 0xf) as usize] as char);
            }
        }
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        hex(&mut s, self.trace_id, 32);
        s.push('-');
        hex(&mut s, u128::from(self.span_id), 16);
        s.push('-');
        hex(&mut s, u128::from(self.flags), 2);
        s
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

tokio::task_local! {
    static CURRENT_TRACE: TraceContext;
}
