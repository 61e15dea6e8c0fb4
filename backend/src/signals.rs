//! Signals: SIGUSR1 prints every port's counters; SIGTERM/SIGINT stop the process.
//!
//! The signals are blocked in every thread and taken synchronously by one thread with
//! `sigwait`, so no handler runs in signal context and the data path is never interrupted.

use std::sync::{Arc, Mutex};

use crate::stats::PortStats;
use log::info;

const SIGNALS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT];

fn set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in SIGNALS {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// Blocks the signals in this thread and every thread spawned after.
pub fn block() -> std::io::Result<()> {
    let s = set();
    // SAFETY: valid sigset pointer; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The ports whose counters SIGUSR1 prints.
#[derive(Clone)]
pub struct Registry(Arc<Mutex<Vec<Arc<PortStats>>>>);

impl Registry {
    pub fn new(ports: Vec<Arc<PortStats>>) -> Self {
        Registry(Arc::new(Mutex::new(ports)))
    }

    pub fn add(&self, port: Arc<PortStats>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(port);
    }

    /// The ports registered so far.
    pub fn ports(&self) -> Vec<Arc<PortStats>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn print(&self) {
        let ports = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for p in ports.iter() {
            out.push_str(&p.to_string());
        }
        eprint!("{out}");
    }
}

pub fn spawn_handler(registry: Registry) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let s = set();
            let mut sig: libc::c_int = 0;
            // SAFETY: valid pointers to a sigset and an int.
            if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                continue;
            }
            if sig == libc::SIGUSR1 {
                registry.print();
            } else {
                info!("signal {sig}: exiting");
                std::process::exit(0);
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}");
    }
}
