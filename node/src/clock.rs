//! Wall-clock time for the node's I/O side (the round machine gets it as an argument).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 before the epoch).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
