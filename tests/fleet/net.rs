//! The fleet's network: one network namespace per host (origin, mirror,
//! nodes), each joined by a veth pair to a bridge in the root namespace, links
//! capped with tbf (this kernel has no netem, so no added delay). Names and the
//! /24 are unique per run; everything is removed on drop, panics included.
use crate::common::{require_tool, run, run_output};
use std::process::Command;

/// Rate caps (Mbit/s) of the fleet's links, each on the sending side.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// The origin's egress: what the origin registry can send, to the mirror or anyone.
    pub origin_mbit: u64,
    /// The mirror's egress, shared by every node it serves.
    pub mirror_mbit: u64,
    /// Each node's downlink.
    pub node_mbit: u64,
}

/// A host of the fleet: its namespace and address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub ip: String,
}

/// The bridge, the namespaces and their veth pairs.
pub struct Fleet {
    bridge: String,
    pub origin: Host,
    pub mirror: Host,
    pub nodes: Vec<Host>,
    pub rates: Rates,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn in_ns(ns: &str, args: &[&str]) {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args));
}

/// `tc` arguments for tbf at `mbit` on `dev`'s egress; a burst of ~2 ms of
/// traffic keeps it accurate at high rates.
fn tbf(dev: &str, mbit: u64) -> Vec<String> {
    let burst = (mbit * 1_000_000 / 8 / 500).max(64 << 10).to_string();
    let rate = format!("{mbit}mbit");
    [
        "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms",
    ]
    .map(String::from)
    .to_vec()
}

impl Fleet {
    /// Builds the bridge and `nodes` node namespaces plus the origin's and the mirror's.
    pub fn create(nodes: usize, rates: Rates) -> Fleet {
        require_tool("ip");
        require_tool("tc");
        require_tool("nsenter");
        // Unique per run: the pid picks the names and the 10.214.X.0/24 subnet.
        let id = std::process::id() % 250;
        let tag = format!("{:x}", std::process::id() & 0xfffff);
        let net = |host: u32| format!("10.214.{id}.{host}");
        let mut fleet = Fleet {
            bridge: format!("sfb{tag}"),
            origin: Host {
                netns: format!("ssfleet-{tag}-origin"),
                ip: net(2),
            },
            mirror: Host {
                netns: format!("ssfleet-{tag}-mirror"),
                ip: net(3),
            },
            nodes: (0..nodes)
                .map(|i| Host {
                    netns: format!("ssfleet-{tag}-node{i}"),
                    ip: net(10 + i as u32),
                })
                .collect(),
            rates,
            namespaces: Vec::new(),
        };
        ip(&["link", "add", &fleet.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", net(1)), "dev", &fleet.bridge]);
        ip(&["link", "set", &fleet.bridge, "up"]);
        let hosts: Vec<(Host, Option<u64>, Option<u64>)> = [
            (fleet.origin.clone(), Some(rates.origin_mbit), None),
            (fleet.mirror.clone(), Some(rates.mirror_mbit), None),
        ]
        .into_iter()
        .chain(fleet.nodes.iter().map(|n| (n.clone(), None, Some(rates.node_mbit))))
        .collect();
        for (i, (host, egress, downlink)) in hosts.into_iter().enumerate() {
            ip(&["netns", "add", &host.netns]);
            fleet.namespaces.push(host.netns.clone());
            let outer = format!("sfv{tag}-{i}");
            ip(&[
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.netns,
            ]);
            ip(&["link", "set", &outer, "master", &fleet.bridge]);
            ip(&["link", "set", &outer, "up"]);
            in_ns(&host.netns, &["ip", "link", "set", "lo", "up"]);
            in_ns(
                &host.netns,
                &["ip", "addr", "add", &format!("{}/24", host.ip), "dev", "eth0"],
            );
            in_ns(&host.netns, &["ip", "link", "set", "eth0", "up"]);
            if let Some(mbit) = egress {
                run(Command::new("ip")
                    .args(["netns", "exec", &host.netns, "tc"])
                    .args(tbf("eth0", mbit)));
            }
            if let Some(mbit) = downlink {
                run(Command::new("tc").args(tbf(&outer, mbit)));
            }
        }
        fleet
    }

    /// Runs `args` inside `host`'s namespace; returns stdout (panics on failure).
    pub fn exec(&self, host: &Host, args: &[&str]) -> String {
        run(Command::new("ip").args(["netns", "exec", &host.netns]).args(args))
    }

    /// Bytes `host` has sent so far on its link (wire bytes, TCP/IP framing included).
    pub fn tx_bytes(&self, host: &Host) -> u64 {
        self.exec(host, &["cat", "/sys/class/net/eth0/statistics/tx_bytes"])
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// MB/s of one HTTP GET of `url` from `host` (a link check).
    pub fn curl_mbs(&self, host: &Host, url: &str) -> f64 {
        let out = self.exec(
            host,
            &["curl", "-sSf", "-o", "/dev/null", "-w", "%{speed_download}", url],
        );
        out.trim().parse::<f64>().unwrap_or(f64::NAN) / 1e6
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and with it its peer on the bridge.
        for ns in &self.namespaces {
            let _ = run_output(Command::new("ip").args(["netns", "del", ns]));
        }
        let _ = run_output(Command::new("ip").args(["link", "del", &self.bridge]));
    }
}
