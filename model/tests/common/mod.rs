//! Support code shared by several test binaries (each includes it with `mod common;`).

pub(crate) mod reference;
