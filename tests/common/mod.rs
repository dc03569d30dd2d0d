//! Helpers shared by the integration tests. Each test binary that needs them
//! declares `mod common;`.

pub mod envoy;
pub mod kube;
pub mod meshid;
pub mod moto;
pub mod proxy;
pub mod raw_h2;
