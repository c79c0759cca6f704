//! What this machine has: its memory, so that a program can refuse a request that could never
//! run (a batch or a weight larger than the machine) before an allocation aborts the process.

/// Bytes of memory this machine has (`MemTotal` of `/proc/meminfo`), where it can be told
/// (`None` elsewhere, or where the file cannot be read).
///
/// ```
/// if let Some(bytes) = nibble_tensor::machine::memory_bytes() {
///     assert!(bytes > 0);
/// }
/// ```
pub fn memory_bytes() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `Err((needed, total))` where `bytes` exceed what [`memory_bytes`] says this machine has in
/// all (the two in GiB, for a message); `Ok` where they fit or the machine cannot tell.
///
/// ```
/// assert!(nibble_tensor::machine::fits(1).is_ok());
/// assert!(nibble_tensor::machine::fits(u128::MAX).is_err() || nibble_tensor::machine::memory_bytes().is_none());
/// ```
pub fn fits(bytes: u128) -> Result<(), (f64, f64)> {
    match memory_bytes() {
        Some(total) if bytes > total => Err((gib(bytes), gib(total))),
        _ => Ok(()),
    }
}

/// Bytes in GiB.
fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
