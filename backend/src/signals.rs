//! Signals: SIGUSR1 prints every port's counters; SIGHUP reloads; SIGTERM/SIGINT stop the
//! process cleanly.
//!
//! The signals are blocked in every thread and taken synchronously by one thread with
//! `sigwait`, so no handler runs in signal context and the data path is never interrupted.

use log::{error, info};

use crate::control::ControlSocket;
use crate::service::Service;

const SIGNALS: [libc::c_int; 4] = [libc::SIGUSR1, libc::SIGHUP, libc::SIGTERM, libc::SIGINT];

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

/// Takes the signals on the calling thread for good: SIGUSR1 prints every port's counters,
/// SIGHUP reloads the config file (an error is logged and changes nothing), SIGTERM and
/// SIGINT stop every port cleanly (frontends disconnected, socket files removed, VF sockets
/// and XDP programs closed), remove the control socket and exit 0.
pub fn handle(service: &Service, control: Option<ControlSocket>) -> ! {
    loop {
        let s = set();
        let mut sig: libc::c_int = 0;
        // SAFETY: valid pointers to a sigset and an int.
        if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
            continue;
        }
        match sig {
            libc::SIGUSR1 => eprint!("{}", service.counters_report()),
            libc::SIGHUP => match service.reload() {
                Ok(_) => {}
                Err(e) => error!("reload failed, nothing changed: {e}"),
            },
            _ => {
                info!("signal {sig}: stopping");
                crate::systemd::notify_stopping();
                service.shutdown();
                drop(control);
                info!("stopped");
                std::process::exit(0);
            }
        }
    }
}
