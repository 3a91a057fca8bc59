//! Stable digests and slots for provider code: the default deduplication id of an
//! event, hex SHA-256, and the FNV-1a slot of an ordering key (lanes, partitions).

/// The default deduplication id of a CloudEvent: the SHA-256 of its `source` and `id`
/// (the pair the spec makes unique), as 64 lowercase hex digits, which every broker's
/// id alphabet and length limit accept (SQS: 128 of `[!-~]`; Service Bus: 128).
///
/// ```
/// use cloudbus_driver::hashing::dedup_digest;
/// assert_eq!(dedup_digest("/a", "1").len(), 64);
/// assert_ne!(dedup_digest("/a", "1"), dedup_digest("/b", "1"));
/// assert_ne!(dedup_digest("/a", "1/b"), dedup_digest("/a/1", "b"));
/// ```
pub fn dedup_digest(source: &str, id: &str) -> String {
    hex_sha256(&[source.as_bytes(), b"\x1f", id.as_bytes()])
}

/// The SHA-256 of the concatenated `parts`, as lowercase hex.
pub fn hex_sha256(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    lower_hex(&hasher.finalize())
}

/// `bytes` as lowercase hex, two digits a byte (without a formatter call per byte:
/// it is on the path of every message published and received).
///
/// ```
/// assert_eq!(cloudbus_driver::hashing::lower_hex(&[0x00, 0xab, 0x7f]), "00ab7f");
/// ```
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Maps a key to one of `slots` slots, stably across processes and runs (FNV-1a):
/// one ordering key always lands in the same publisher lane or log partition.
///
/// ```
/// assert_eq!(cloudbus_driver::hashing::key_slot("customer-7", 4), cloudbus_driver::hashing::key_slot("customer-7", 4));
/// assert!(cloudbus_driver::hashing::key_slot("x", 3) < 3);
/// ```
pub fn key_slot(key: &str, slots: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % slots.max(1) as u64) as usize
}
