//! Nodes behind home routers, for real: network namespaces made by this test (`ip netns`, veth
//! pairs, an nftables masquerade per router), three `hive-node join` processes on the tiny
//! network.
//!
//! ```text
//!   ns pub: bridge 10.77.0.1/24, the bootstrap node (--relay)
//!      ├── ns router a: wan 10.77.0.2 ── masquerade ── lan 192.168.1.1 ── ns home a: 192.168.1.2
//!      └── ns router b: wan 10.77.0.3 ── masquerade ── lan 192.168.2.1 ── ns home b: 192.168.2.2
//! ```
//!
//! Each router forwards what its home sends out and drops what arrives unasked (a stateful
//! firewall, as home routers have). `cone`: the masquerade keeps source ports (one mapping per
//! inside address and port, whoever the peer is: endpoint-independent). `symmetric`: `random`
//! ports, a new mapping per destination.
//!
//! What must hold: the home nodes learn they cannot be reached (AutoNAT), listen through the
//! bootstrap node (circuit relay v2) and reach each other through it; behind cone NATs the
//! relayed connection is upgraded to a direct one (DCUtR hole punching, over QUIC) and the
//! bootstrap node serves at most one copy of each home node's adapter; behind symmetric NATs
//! they stay relayed. Either way all three nodes commit the same round with the three adapters.
//!
//! Needs root (or CAP_NET_ADMIN), `ip` and `nft`. Where the machine cannot make namespaces the
//! test says why and passes, unless `HIVE_REQUIRE_NETNS=1` (set by .ci/run where it can).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{tiny_model, tiny_network_flags, wait_for, Proc, BIN, RANK};
use hivemind_node::harness::NodeProcess;
use serde_json::Value;

/// One lab: five namespaces named `<prefix>-{pub,ra,rb,ha,hb}`, deleted when dropped.
struct Lab {
    prefix: String,
}

const NAMESPACES: [&str; 5] = ["pub", "ra", "rb", "ha", "hb"];

fn run(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Makes the namespaces, links and routers; `Err` says what the machine could not do.
    fn up(prefix: &str, symmetric: bool) -> Result<Lab, String> {
        remove_stale_labs();
        let lab = Lab {
            prefix: prefix.to_string(),
        };
        lab.down();
        for n in NAMESPACES {
            let ns = lab.ns(n);
            run(&["ip", "netns", "add", &ns], None)?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"], None)?;
        }
        let public = lab.ns("pub");
        let ip = |ns: &str, rest: &[&str]| -> Result<(), String> {
            let mut a = vec!["ip", "-n", ns];
            a.extend_from_slice(rest);
            run(&a, None)
        };
        ip(&public, &["link", "add", "br0", "type", "bridge"])?;
        ip(&public, &["addr", "add", "10.77.0.1/24", "dev", "br0"])?;
        ip(&public, &["link", "set", "br0", "up"])?;
        for (r, wan, lan_net) in [("a", "10.77.0.2", "1"), ("b", "10.77.0.3", "2")] {
            let (router, home) = (lab.ns(&format!("r{r}")), lab.ns(&format!("h{r}")));
            let up = format!("up-{r}");
            run(
                &[
                    "ip", "link", "add", &up, "netns", &public, "type", "veth", "peer", "name",
                    "wan", "netns", &router,
                ],
                None,
            )?;
            ip(&public, &["link", "set", &up, "master", "br0", "up"])?;
            ip(
                &router,
                &["addr", "add", &format!("{wan}/24"), "dev", "wan"],
            )?;
            ip(&router, &["link", "set", "wan", "up"])?;
            run(
                &[
                    "ip", "link", "add", "lan", "netns", &router, "type", "veth", "peer", "name",
                    "eth0", "netns", &home,
                ],
                None,
            )?;
            let gw = format!("192.168.{lan_net}.1");
            ip(&router, &["addr", "add", &format!("{gw}/24"), "dev", "lan"])?;
            ip(&router, &["link", "set", "lan", "up"])?;
            ip(
                &home,
                &[
                    "addr",
                    "add",
                    &format!("192.168.{lan_net}.2/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            ip(&home, &["link", "set", "eth0", "up"])?;
            ip(&home, &["route", "add", "default", "via", &gw])?;
            run(
                &[
                    "ip",
                    "netns",
                    "exec",
                    &router,
                    "sh",
                    "-c",
                    "echo 1 > /proc/sys/net/ipv4/ip_forward",
                ],
                None,
            )?;
            let ports = if symmetric { "random" } else { "" };
            let rules = format!(
                "table ip nat {{\n\
                 chain post {{ type nat hook postrouting priority 100; oifname \"wan\" masquerade {ports}; }}\n\
                 }}\n\
                 table ip filter {{\n\
                 chain inbound {{ type filter hook input priority 0; iifname \"wan\" ct state new drop; }}\n\
                 chain through {{ type filter hook forward priority 0; iifname \"wan\" ct state new drop; }}\n\
                 }}\n"
            );
            run(
                &["ip", "netns", "exec", &router, "nft", "-f", "-"],
                Some(&rules),
            )?;
        }
        Ok(lab)
    }

    fn down(&self) {
        for n in NAMESPACES {
            let _ = run(&["ip", "netns", "del", &self.ns(n)], None);
        }
    }

    /// `hive-node join` on the tiny network inside namespace `n`.
    fn node(&self, n: &str, model: &Path, data: &Path, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = ["netns", "exec", &self.ns(n), BIN, "join"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(tiny_network_flags(model));
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc {
            node: NodeProcess::start(Path::new("ip"), &args, data).unwrap(),
            data: data.to_path_buf(),
        }
    }
}

/// Namespaces of labs whose test process is gone (killed before its `Drop` ran).
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("hmc")
            .or_else(|| name.strip_prefix("hms"))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = run(&["ip", "netns", "del", name], None);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}

/// The lab, or `None` (having said why) where the machine cannot make network namespaces or
/// has no nftables. Past that check, a lab that cannot be built fails the test.
fn lab(prefix: &str, symmetric: bool) -> Option<Lab> {
    // A namespace that can hold a masquerade: what the lab needs of the kernel and the tools.
    let probe = format!("{prefix}-probe");
    let can = run(&["ip", "netns", "add", &probe], None).and_then(|()| {
        let nat = run(
            &["ip", "netns", "exec", &probe, "nft", "-f", "-"],
            Some("table ip nat {\n chain post { type nat hook postrouting priority 100; masquerade; }\n}\n"),
        );
        let _ = run(&["ip", "netns", "del", &probe], None);
        nat
    });
    match can {
        Ok(()) => Some(Lab::up(prefix, symmetric).unwrap()),
        Err(why) => {
            let msg = format!(
                "cannot build the NAT lab (network namespaces need root or CAP_NET_ADMIN, \
                 `ip` from iproute2 and `nft` from nftables): {why}"
            );
            assert!(std::env::var_os("HIVE_REQUIRE_NETNS").is_none(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

/// The links of `status` to `peer`.
fn links_to(status: &Value, peer: &str) -> Vec<Value> {
    status["links"][peer]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn peer_id(p: &Proc) -> String {
    wait_for("the node's peer id", || {
        p.status()?["peer_id"].as_str().map(str::to_string)
    })
}

/// Three nodes behind the lab's NATs: checks how the home nodes are connected and that a round
/// with all three adapters is committed everywhere.
fn round_behind_nats(prefix: &str, symmetric: bool) {
    let Some(lab) = lab(prefix, symmetric) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 1);
    let quic = "/ip4/0.0.0.0/udp/4001/quic-v1";
    let round = ["--round-secs", "20"];
    let boot_data = dir.path().join("boot");
    let mut extra = vec!["--relay", "--listen", "/ip4/10.77.0.1/udp/4001/quic-v1"];
    extra.extend(round);
    let boot = lab.node("pub", &model, &boot_data, &extra);
    let boot_id = peer_id(&boot);
    let bootstrap = format!("/ip4/10.77.0.1/udp/4001/quic-v1/p2p/{boot_id}");
    let mut extra = vec!["--listen", quic, "--bootstrap", &bootstrap];
    extra.extend(round);
    let a = lab.node("ha", &model, &dir.path().join("a"), &extra);
    let b = lab.node("hb", &model, &dir.path().join("b"), &extra);
    let b_id = peer_id(&b);

    // Both find they are behind a NAT and listen through the bootstrap node.
    for (name, p) in [("a", &a), ("b", &b)] {
        wait_for(&format!("home {name} to listen through the relay"), || {
            let s = p.status()?;
            (s["reachability"] == "private"
                && s["relays"]
                    .as_array()?
                    .iter()
                    .any(|r| r == boot_id.as_str()))
            .then_some(())
        });
    }
    // They reach each other: directly after hole punching behind cone NATs, through the relay
    // behind symmetric ones.
    let connected = |s: &Value| -> Option<()> {
        let links = links_to(s, &b_id);
        let want = if symmetric {
            links.iter().any(|l| l["relayed"] == true)
        } else {
            links
                .iter()
                .any(|l| l["relayed"] == false && l["upgraded"] == true)
        };
        want.then_some(())
    };
    wait_for("home a to reach home b", || connected(&a.status()?));

    // A round with every node's adapter.
    let mut hashes = Vec::new();
    for (i, p) in [&boot, &a, &b].into_iter().enumerate() {
        let adapter = dir.path().join(format!("adapter-{i}"));
        common::tiny_adapter(i as u64 + 1, RANK, 32)
            .write_dir(&adapter)
            .unwrap();
        let out = Command::new(BIN)
            .args(["contribute", "--samples", "10"])
            .arg(&adapter)
            .arg("--data-dir")
            .arg(&p.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "contribute: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        hashes.push(wait_for("the adapter announced", || {
            let s = p.status()?;
            s["own_adapters"]
                .as_array()?
                .first()
                .and_then(|o| o["hash"].as_str().map(str::to_string))
        }));
    }
    let committed: Vec<(u64, String)> = [&boot, &a, &b]
        .iter()
        .map(|p| {
            wait_for("round 1 with 3 contributors", || {
                let s = p.status()?;
                let r = &s["latest_round"];
                (r["number"] == 1 && r["contributors"].as_array()?.len() == 3).then(|| {
                    (
                        r["number"].as_u64().unwrap(),
                        r["hash"].as_str().unwrap().to_string(),
                    )
                })
            })
        })
        .collect();
    assert!(
        committed.iter().all(|c| *c == committed[0]),
        "the three nodes committed different rounds: {committed:?}"
    );

    let (sa, boot_status) = (a.status().unwrap(), boot.status().unwrap());
    assert!(
        connected(&sa).is_some(),
        "home a's links to home b at the end: {:?}",
        links_to(&sa, &b_id)
    );
    if symmetric {
        assert!(
            links_to(&sa, &b_id).iter().all(|l| l["upgraded"] != true),
            "no hole punching through symmetric NATs"
        );
    } else {
        // After the upgrade the relayed connection is closed: nothing between the homes goes
        // through the relay, so their adapters went directly.
        assert!(
            links_to(&sa, &b_id).iter().all(|l| l["relayed"] == false),
            "home a still has a relayed connection to home b: {:?}",
            links_to(&sa, &b_id)
        );
        // Each home adapter crossed the bootstrap node at most once (what it served from its
        // store: one copy it fetched itself, or none).
        for (who, hash, data) in [("a", &hashes[1], &a.data), ("b", &hashes[2], &b.data)] {
            let len = std::fs::metadata(data.join("blobs").join(hash))
                .unwrap()
                .len();
            let served = boot_status["served"][hash.as_str()].as_u64().unwrap_or(0);
            assert!(
                served <= len,
                "the bootstrap node served {served} bytes of home {who}'s {len}-byte adapter"
            );
        }
    }
}

#[test]
fn home_nodes_behind_cone_nats_connect_directly() {
    round_behind_nats(&format!("hmc{}", std::process::id()), false);
}

#[test]
fn home_nodes_behind_symmetric_nats_stay_relayed() {
    round_behind_nats(&format!("hms{}", std::process::id()), true);
}
