//! The `loraga` command line's library side: what the CLI, the benches and the integration
//! tests share.

pub mod bench;
pub mod data_format;
pub mod demo;
pub mod eval_cmd;
pub mod info;
pub mod metrics;
pub mod report;
pub mod summary;
pub mod train;
