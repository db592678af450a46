//! Reads observed as they are served: a seam for whoever wants to know what
//! containers read (the start-up profile recorder), attached and detached at
//! run time, so a layer no one observes pays one atomic load per read.

use crate::digest::Digest;
use crate::index::NodeId;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Told of every read served from a layer while attached.
pub trait ReadObserver: Send + Sync {
    fn read(&self, layer: &Digest, node: NodeId, offset: u64, len: u64);
}

/// At most one observer of a fetcher's reads.
#[derive(Default)]
pub(super) struct ObserverSlot {
    attached: AtomicBool,
    observer: RwLock<Option<Arc<dyn ReadObserver>>>,
}

impl ObserverSlot {
    pub(super) fn attach(&self, o: Arc<dyn ReadObserver>) {
        *self.observer.write() = Some(o);
        self.attached.store(true, Ordering::Release);
    }

    /// Detaches `o` if it is the one attached.
    pub(super) fn detach(&self, o: &Arc<dyn ReadObserver>) {
        let mut slot = self.observer.write();
        if slot.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, o)) {
            *slot = None;
            self.attached.store(false, Ordering::Release);
        }
    }

    pub(super) fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    pub(super) fn notify(&self, layer: &Digest, node: NodeId, offset: u64, len: u64) {
        if !self.attached.load(Ordering::Acquire) {
            return;
        }
        if let Some(o) = self.observer.read().as_ref() {
            o.read(layer, node, offset, len);
        }
    }
}
