//! The workload's SVID, below both its producer (`agent`: rotation, CA client) and its
//! consumers (`sds`, the files sink, the quickstart): the key and CSR sent to the CA
//! ([`generate_csr`]), the validated credential ([`Svid`], made only by
//! [`Svid::from_response`]) and the `watch` channel it is published on ([`SvidReceiver`]).

mod credential;
mod csr;
mod store;
#[cfg(test)]
pub(crate) mod testing;

pub use credential::{Svid, SvidError};
pub use csr::{WorkloadKeyType, generate_csr};
pub use store::{SvidReceiver, SvidSender};
