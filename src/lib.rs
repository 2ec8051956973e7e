//! The `loraga` command line's library side: what the CLI, the benches and the integration
//! tests share.

pub mod info;
pub mod metrics;
pub mod report;
pub mod summary;
