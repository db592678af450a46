//! The benchmark's network: a registry in its own namespace behind a veth pair
//! shaped with tc (tbf caps the rate), plus a relay inside that namespace that
//! holds every byte for half the round-trip time in each direction, since this
//! kernel has no netem to add delay.
use crate::common::{run, run_output};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

pub const NETNS: &str = "streamsnap-bench";
const HOST_IF: &str = "ssbench-h";
const NS_IF: &str = "ssbench-r";
pub const HOST_IP: &str = "10.203.0.1";
pub const REGISTRY_IP: &str = "10.203.0.2";
/// Where the relay listens; the registry itself listens on the namespace's loopback.
pub const RELAY_PORT: u16 = 5000;

/// The emulated link between the node and the registry.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub rate_mbit: u64,
    pub rtt: Duration,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} Mbit/s, {} ms RTT", self.rate_mbit, self.rtt.as_secs_f64() * 1e3)
    }
}

/// The namespace and veth pair; removed on drop.
pub struct Link {
    pub shape: Shape,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn in_ns(args: &[&str]) {
    run(Command::new("ip").args(["netns", "exec", NETNS]).args(args));
}

impl Link {
    /// Creates the namespace and the shaped veth pair (replacing leftovers of an aborted run).
    pub fn create(shape: Shape) -> Link {
        crate::common::require_tool("ip");
        crate::common::require_tool("tc");
        let _ = run_output(Command::new("ip").args(["netns", "del", NETNS]));
        let _ = run_output(Command::new("ip").args(["link", "del", HOST_IF]));
        ip(&["netns", "add", NETNS]);
        ip(&[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NETNS,
        ]);
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", HOST_IF]);
        ip(&["link", "set", HOST_IF, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&["ip", "addr", "add", &format!("{REGISTRY_IP}/30"), "dev", NS_IF]);
        in_ns(&["ip", "link", "set", NS_IF, "up"]);
        // tbf on both egresses; a burst of ~2 ms of traffic keeps tbf accurate at high rates.
        let burst = (shape.rate_mbit * 1_000_000 / 8 / 500).max(64 << 10).to_string();
        let rate = format!("{}mbit", shape.rate_mbit);
        let tbf = ["root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms"];
        run(Command::new("tc").args(["qdisc", "add", "dev", HOST_IF]).args(tbf));
        in_ns(&[&["tc", "qdisc", "add", "dev", NS_IF][..], &tbf[..]].concat());
        Link { shape }
    }

    /// Starts the delaying relay from REGISTRY_IP:RELAY_PORT to the registry on the namespace's loopback.
    /// Plain threads: their sleeps are precise to tens of microseconds (a tokio timer rounds to 1 ms).
    pub fn start_relay(&self, upstream_port: u16) {
        let ns = std::fs::File::open(format!("/run/netns/{NETNS}")).expect("open netns");
        let rtt = self.shape.rtt;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Sockets belong to the namespace of the thread that creates them.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let l = TcpListener::bind((REGISTRY_IP, RELAY_PORT)).expect("bind relay");
            tx.send(()).unwrap();
            for client in l.incoming() {
                let accepted = Instant::now();
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // A real client waits one RTT for the handshake before its request leaves.
                std::thread::spawn(move || delayed_copy(c2, s2, rtt / 2, accepted + rtt));
                std::thread::spawn(move || delayed_copy(server, client, rtt / 2, accepted));
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("relay did not start");
    }

    /// Bytes the node has received over the link so far (wire bytes, with TCP/IP framing).
    pub fn rx_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{HOST_IF}/statistics/rx_bytes"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Ping RTT (the veth alone: ICMP does not pass the relay), median of 5.
    pub fn ping_ms(&self) -> f64 {
        let out = run(Command::new("ping").args(["-c", "5", "-i", "0.2", "-q", REGISTRY_IP]));
        // rtt min/avg/max/mdev = a/b/c/d ms
        out.lines()
            .find(|l| l.contains("min/avg/max"))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.trim().split('/').nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = run_output(Command::new("ip").args(["netns", "del", NETNS]));
    }
}

/// Copies `r` to `w`, each piece leaving `delay` after it arrived (never before
/// `not_before + delay`); pieces queue, so the delay does not cap throughput.
fn delayed_copy(mut r: TcpStream, mut w: TcpStream, delay: Duration, not_before: Instant) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(1024);
    let writer = std::thread::spawn(move || {
        for (due, buf) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if w.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = w.shutdown(Shutdown::Write);
    });
    loop {
        let mut buf = vec![0u8; 256 << 10];
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.send((Instant::now().max(not_before) + delay, buf)).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}
