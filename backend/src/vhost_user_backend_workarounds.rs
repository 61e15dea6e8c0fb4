//! Where vhost-user-backend 0.24 (over the vhost crate 0.18) does not do what a QEMU frontend
//! needs, and what vhost-relay does about it. Relay ports keep vhost-user-backend for its
//! request handling and worker threads; each workaround below says what is wrong upstream,
//! where we work around it, and when the workaround can go.
//!
//! 1. **Early SET_VRING_ENABLE.** QEMU's virtio-net sends SET_VRING_ENABLE as soon as the
//!    guest driver acks its features, before SET_FEATURES reaches the backend; the vhost
//!    crate's dispatcher and the library's handler refuse it until PROTOCOL_FEATURES is
//!    acked, and drop the connection. The protocol shim defers such messages and replays
//!    them after the SET_FEATURES that acks PROTOCOL_FEATURES ([`EnableDeferral`], used by
//!    [`crate::protocol_shim`], as the library never sees the messages it holds back).
//!    *Remove when* the handler accepts SET_VRING_ENABLE once PROTOCOL_FEATURES was offered
//!    (the spec's rule for a backend that offers it), rather than acked.
//! 2. **RESET_DEVICE forgets PROTOCOL_FEATURES.** QEMU sends RESET_DEVICE when it connects if
//!    the backend offers the protocol feature; the handler then clears the acked
//!    PROTOCOL_FEATURES bit and refuses the SET_VRING_ENABLE that follows. So we withhold
//!    the RESET_DEVICE protocol feature ([`crate::device::protocol_features`]); a device
//!    reset still reaches us as GET_VRING_BASE on every ring and a fresh setup. *Remove when*
//!    the handler keeps PROTOCOL_FEATURES across RESET_DEVICE (it is a protocol, not a
//!    device, feature).
//! 3. **Exit eventfds leak.** The library registers each worker's exit eventfd with
//!    `into_raw_fd()` and never closes it, one fd per queue pair and connection.
//!    [`ExitFds`] keeps them and closes them with the session's device. *Remove when* the
//!    library owns (and closes) the fds `exit_event` returns.
//! 4. **SET_VRING_ADDR rolls back a running ring's used index.** The handler re-derives
//!    `next_used` from guest memory in two steps under two locks, so a worker batch
//!    published in between is undone and the next batch would overwrite used entries the
//!    guest has seen. QEMU re-sends SET_VRING_ADDR to every running ring when migration
//!    turns logging on or off, so this happens under traffic. [`UsedIndexKeeper`] puts our
//!    index back. *Remove when* the handler updates a ready ring's addresses without
//!    touching `next_used`, or under the lock the worker holds.
//! 5. **Only a listener can start a session.** `VhostUserDaemon::start` accepts its
//!    connection from a `Listener`, and `start_client` connects by path; neither takes a
//!    connected stream, which the shim (and client-mode and inherited-socket ports) have.
//!    [`private_connection`] makes a throwaway listener only we can reach. *Remove when* the
//!    daemon can be started on a `UnixStream`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::Listener;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Workaround 1: the SET_VRING_ENABLE requests of one connection that arrive before the
/// backend can take them, kept (the latest state per ring) for replay after SET_FEATURES.
pub struct EnableDeferral {
    /// PROTOCOL_FEATURES acked by a SET_FEATURES that reached the backend.
    protocol_features_acked: bool,
    /// Latest deferred enable state of each ring of the port (sized once: a frontend
    /// cannot make it grow, and finding a ring costs nothing).
    deferred: Box<[Option<u32>]>,
}

impl EnableDeferral {
    /// The state for a connection to a port with `rings` virtqueues.
    pub fn new(rings: usize) -> Self {
        EnableDeferral {
            protocol_features_acked: false,
            deferred: vec![None; rings].into_boxed_slice(),
        }
    }

    pub fn rings(&self) -> usize {
        self.deferred.len()
    }

    /// RESET_OWNER or RESET_DEVICE: the backend forgets the acked features.
    pub fn reset(&mut self) {
        self.protocol_features_acked = false;
    }

    /// A SET_FEATURES of `features` goes to the backend: the (ring, enable) states to send
    /// right after it, if it acks PROTOCOL_FEATURES.
    pub fn features_set(&mut self, features: u64) -> Vec<(u32, u32)> {
        self.protocol_features_acked =
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if !self.protocol_features_acked {
            return Vec::new();
        }
        (0u32..)
            .zip(self.deferred.iter_mut())
            .filter_map(|(index, state)| Some((index, state.take()?)))
            .collect()
    }

    /// A SET_VRING_ENABLE of (ring, enable), `None` if its payload is too short: whether
    /// to hold it back (true: answered by the shim, kept for replay) or forward it, or why
    /// the connection must end (a ring the port does not have).
    pub fn vring_enable(&mut self, request: Option<(u32, u32)>) -> Result<bool, String> {
        let Some((index, enable)) = request else {
            // Too short: the backend refuses it once it gets it; held back, nothing to keep.
            return Ok(!self.protocol_features_acked);
        };
        let rings = self.deferred.len();
        let Some(state) = self.deferred.get_mut(index as usize) else {
            return Err(format!("SET_VRING_ENABLE for ring {index} of {rings}"));
        };
        if self.protocol_features_acked {
            return Ok(false);
        }
        *state = Some(enable);
        Ok(true)
    }
}

/// Workaround 3: the exit eventfds handed to a session's workers, closed when the session's
/// device goes away (after its workers are gone).
#[derive(Default)]
pub struct ExitFds(Mutex<Vec<RawFd>>);

impl ExitFds {
    /// A new exit event for a worker (`VhostUserBackend::exit_event`), its fd remembered.
    pub fn new_event(&self) -> Option<(EventConsumer, EventNotifier)> {
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pair.0.as_raw_fd());
        Some(pair)
    }
}

impl Drop for ExitFds {
    fn drop(&mut self) {
        let fds = std::mem::take(self.0.get_mut().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            // SAFETY: each fd is an eventfd we created for a worker; the library took it with
            // into_raw_fd() and never closes it. This is dropped with the session's device,
            // only after the daemon, its handler and every worker thread (which hold clones
            // of the device) are gone, so no one uses the fd any more.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Workaround 4: the used index a worker last published on a running queue (`None` until
/// its first run, and again after a stop or reset). Only a stop (GET_VRING_BASE) or reset
/// may move a running ring's used index; otherwise ours stands.
#[derive(Debug, Default)]
pub struct UsedIndexKeeper(Option<u16>);

impl UsedIndexKeeper {
    /// Remembers the index a run ended with (`None`: the ring is not running).
    pub fn published(&mut self, used: Option<u16>) {
        self.0 = used;
    }

    /// A stop or reset: whatever the queue's used index becomes is right.
    pub fn forget(&mut self) {
        self.0 = None;
    }

    /// Puts our used index back if something else moved it since our last run.
    pub fn restore(&self, queue: &mut Queue, label: &str) {
        let Some(ours) = self.0 else { return };
        let theirs = queue.next_used();
        if theirs != ours {
            log::debug!(
                "{label}: used index {theirs} set behind our back (SET_VRING_ADDR racing a batch); keeping {ours}"
            );
            queue.set_next_used(ours);
        }
    }
}

/// Workaround 5: a listener with one connection already pending on it, and that
/// connection's other end.
///
/// The socket is bound in a fresh directory only we can enter, connected to, and then the
/// socket and directory are removed at once (a pending connection survives the unlink), so
/// nothing else can reach the library's side and nothing is left on disk if we are killed.
pub fn private_connection(port: &str) -> std::io::Result<(Listener, UnixStream)> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let safe: String = port
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vhost-relay.{}.{safe}.{n}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let sock = dir.join("backend.sock");
    let made = UnixListener::bind(&sock).and_then(|l| Ok((l, UnixStream::connect(&sock)?)));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    let (listener, stream) = made?;
    Ok((Listener::from(listener), stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_index_moved_behind_a_running_queue_is_put_back() {
        let mut q = Queue::new(16).unwrap();
        let mut keeper = UsedIndexKeeper::default();
        // Not running yet: anything goes.
        q.set_next_used(5);
        keeper.restore(&mut q, "test");
        assert_eq!(q.next_used(), 5);
        // Running at 7, rolled back to 3 by a racing SET_VRING_ADDR: 7 again.
        keeper.published(Some(7));
        q.set_next_used(3);
        keeper.restore(&mut q, "test");
        assert_eq!(q.next_used(), 7);
        // After a stop, the index the frontend sets stands.
        keeper.forget();
        q.set_next_used(2);
        keeper.restore(&mut q, "test");
        assert_eq!(q.next_used(), 2);
    }

    #[test]
    fn the_private_listener_is_gone_from_disk_with_its_connection_pending() {
        let (listener, stream) = private_connection("a/b c").unwrap();
        let local = stream.peer_addr().unwrap();
        // Unlinked at once: nothing else can connect.
        let path = local.as_pathname().unwrap();
        assert!(!path.exists());
        assert!(!path.parent().unwrap().exists());
        drop(listener);
    }
}
