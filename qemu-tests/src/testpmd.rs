//! DPDK testpmd as an independent vhost-user *frontend* (`virtio_user`), driven interactively.
//!
//! A second frontend besides QEMU catches backend bugs that QEMU's particular order of
//! vhost-user messages would hide, and pushes packets far faster than a TCG guest can.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use crate::backend::dpdk_eal_args;
use crate::console::Console;
use crate::error::{Error, Result};
use crate::util;

/// testpmd's interactive prompt.
const PROMPT: &str = "testpmd> ";

/// Counters of `show port stats` for one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_missed: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_bytes: u64,
}

/// Parses the "NIC statistics for port N" block of `show port stats`.
pub fn parse_port_stats(text: &str) -> Result<PortStats> {
    let tokens: Vec<&str> = text.split_whitespace().collect();
    let get = |key: &str| -> Result<u64> {
        tokens
            .windows(2)
            .find(|w| w[0] == key)
            .and_then(|w| w[1].parse().ok())
            .ok_or_else(|| Error::Parse {
                what: format!("testpmd port stats ({key})"),
                detail: text.to_string(),
            })
    };
    Ok(PortStats {
        rx_packets: get("RX-packets:")?,
        rx_missed: get("RX-missed:")?,
        rx_bytes: get("RX-bytes:")?,
        rx_errors: get("RX-errors:")?,
        tx_packets: get("TX-packets:")?,
        tx_errors: get("TX-errors:")?,
        tx_bytes: get("TX-bytes:")?,
    })
}

/// How to start a [`TestpmdFrontend`].
#[derive(Clone, Debug, Default)]
pub struct FrontendOptions {
    /// Queue pairs (0 is taken as 1).
    pub queues: u16,
    /// Descriptors per ring (`queue_size`, `--rxd`, `--txd`); testpmd's default if `None`.
    pub ring_size: Option<u16>,
    /// Appended to the `virtio_user0,...` device arguments, e.g. `,mrg_rxbuf=0`.
    pub vdev_extra: String,
    /// The CPU the forwarding thread runs on (of 0 and 1); testpmd's choice if `None`.
    pub forwarding_core: Option<u8>,
}

/// An interactive `dpdk-testpmd -i` with one `virtio_user` port; killed by PID on drop.
#[derive(Debug)]
pub struct TestpmdFrontend {
    child: Child,
    console: Console,
    prefix: String,
}

impl TestpmdFrontend {
    /// Starts testpmd connecting to the backend listening on `socket`, and waits for its prompt.
    pub fn spawn(socket: &Path, queues: u16, workdir: &Path) -> Result<Self> {
        Self::spawn_with(
            socket,
            &FrontendOptions {
                queues,
                ..FrontendOptions::default()
            },
            workdir,
        )
    }

    /// [`TestpmdFrontend::spawn`] with ring sizes, extra `virtio_user` arguments and the
    /// forwarding core chosen (the benchmark puts it on the core the backend does not use).
    pub fn spawn_with(socket: &Path, opts: &FrontendOptions, workdir: &Path) -> Result<Self> {
        let prefix = util::unique_name("vrt-vu");
        let q = opts.queues.max(1).to_string();
        let err_path = workdir.join(format!("{prefix}.stderr"));
        let stderr = std::fs::File::create(&err_path)
            .map_err(|e| Error::io(format!("creating {}", err_path.display()), e))?;
        // testpmd prints with stdio, block-buffered on a pipe: without line buffering its
        // answers would only appear when it exits.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "dpdk-testpmd"])
            .args(dpdk_eal_args(&prefix));
        if let Some(core) = opts.forwarding_core {
            // The other core runs the prompt (idle); forwarding goes to `core`.
            cmd.arg("--main-lcore")
                .arg(if core == 0 { "1" } else { "0" });
        }
        let mut vdev = format!("virtio_user0,path={},queues={q}", socket.display());
        if let Some(n) = opts.ring_size {
            vdev.push_str(&format!(",queue_size={n}"));
        }
        vdev.push_str(&opts.vdev_extra);
        cmd.arg("--vdev")
            .arg(vdev)
            .args(["--", "-i", "--total-num-mbufs=16384", "--nb-cores=1"])
            .arg(format!("--rxq={q}"))
            .arg(format!("--txq={q}"));
        if let Some(n) = opts.ring_size {
            cmd.arg(format!("--rxd={n}")).arg(format!("--txd={n}"));
        }
        cmd.stderr(stderr);
        let (child, console) = Console::spawn(
            "testpmd",
            &mut cmd,
            Some(&workdir.join(format!("{prefix}.log"))),
        )?;
        let mut t = TestpmdFrontend {
            child,
            console,
            prefix,
        };
        t.console.wait_for(PROMPT, Duration::from_secs(60))?;
        Ok(t)
    }

    /// Runs one interactive command and returns what it printed before the next prompt.
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.console.send(&format!("{cmd}\n"))?;
        self.console.wait_for(PROMPT, timeout)
    }

    /// `show port stats 0`, parsed.
    pub fn port_stats(&mut self) -> Result<PortStats> {
        let out = self.command("show port stats 0", Duration::from_secs(20))?;
        parse_port_stats(&out)
    }

    /// The testpmd PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `quit`, then waits for testpmd to exit (killing it by PID if it does not).
    pub fn quit(mut self) -> Result<()> {
        self.console.send("quit\n")?;
        let child = &mut self.child;
        let r = util::wait_until("testpmd to quit", Duration::from_secs(20), || {
            child
                .try_wait()
                .map_err(|e| Error::io("waiting for testpmd", e))
        });
        r.map(|_| ())
    }
}

impl Drop for TestpmdFrontend {
    fn drop(&mut self) {
        util::stop_child(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(crate::backend::dpdk_runtime_dir(&self.prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "
  ######################## NIC statistics for port 0  ########################
  RX-packets: 49971      RX-missed: 0          RX-bytes:  3198144
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 50003      TX-errors: 0          TX-bytes:  3200192

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
";

    #[test]
    fn parses_show_port_stats() {
        let s = parse_port_stats(BLOCK).unwrap();
        assert_eq!(
            s,
            PortStats {
                rx_packets: 49971,
                rx_missed: 0,
                rx_bytes: 3198144,
                rx_errors: 0,
                tx_packets: 50003,
                tx_errors: 0,
                tx_bytes: 3200192,
            }
        );
    }

    #[test]
    fn missing_counters_are_errors() {
        assert!(matches!(
            parse_port_stats("Invalid port 0"),
            Err(Error::Parse { .. })
        ));
    }
}
