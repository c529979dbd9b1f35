//! blobstage: the node agent that stages registered, verified blobs onto local disk.
//!
//! The binary is a thin shell around this library: [`cli`] parses the command line and calls
//! [`stage::Stager`], which resolves an artifact through the control plane, checks policy,
//! transfers it with [`transfer`] from a [`source`] while [`digest`] hashes it in order, and
//! publishes it into the [`store`]. Nothing here prints to stdout except [`cli`].

// One audited exception, `writeback`, allows it for one system call.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod errors;
#[doc(hidden)]
pub mod fuzzing;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod redact;
pub mod report;
pub mod source;
pub mod stage;
pub mod store;
pub mod transfer;
mod writeback;
