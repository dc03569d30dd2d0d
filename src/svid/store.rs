//! The channel a validated SVID is published on.

use std::sync::Arc;

use tokio::sync::watch;

use super::Svid;

/// The SVID currently held, if any, as published by the rotation loop. Only validated SVIDs
/// are ever published; `None` until the first one arrives.
pub type SvidReceiver = watch::Receiver<Option<Arc<Svid>>>;
/// The publishing side of [`SvidReceiver`].
pub type SvidSender = watch::Sender<Option<Arc<Svid>>>;
