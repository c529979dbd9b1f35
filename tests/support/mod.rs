//! Shared helpers for the integration tests: each test file declares `mod support;`
//! and uses only the pieces it needs, hence the crate-wide `dead_code` allowance.
#![allow(dead_code)]

pub mod agent;
pub mod cloud;
pub mod daemon;
pub mod front;
pub mod hub;
pub mod origin;
pub mod plane;
pub mod servers;
