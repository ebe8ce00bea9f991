//! `hive-node status`: a running node's peer id, addresses, peers and rounds, read from the
//! status file it keeps in its data dir.

use anyhow::Result;
use clap::Args;

use super::args::DataDirArg;

/// Arguments of `hive-node status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Data directory of the node.
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hive-node status`.
pub(super) fn run(args: StatusArgs) -> Result<()> {
    let s = args.data_dir.dir().running_status()?;
    if args.json {
        let v = serde_json::json!({
            "peer_id": s.peer_id,
            "listen_addrs": s.listen_addrs,
            "connected_peers": s.connected_peers,
            "current_round": s.current_round,
            "current_contributors": s.current_contributors,
            "latest_round": s.latest_round,
            "model_id": s.model_id,
            "penalties": s.penalties,
            "inbox_waiting": s.inbox_waiting,
            "links": s.links,
            "own_adapters": s.own_adapters,
            "transfers": s.transfers,
            "aggregating": s.aggregating,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("peer id:         {}", s.peer_id);
    for a in &s.listen_addrs {
        println!("listening on:    {a}");
    }
    println!("reachability:    {}", s.reachability);
    for r in &s.relays {
        println!("listening via:   relay {r}");
    }
    println!("connected peers: {}", s.connected_peers);
    for (peer, links) in &s.links {
        for l in links {
            println!(
                "  {peer}  {} {}  {}",
                if l.relayed {
                    "relayed"
                } else if l.upgraded {
                    "upgraded"
                } else {
                    "direct"
                },
                if l.outbound { "dialled" } else { "inbound" },
                l.addr
            );
        }
    }
    println!(
        "current round:   {} ({} contributors so far)",
        s.current_round,
        s.current_contributors.len()
    );
    for t in &s.transfers {
        println!(
            "fetching:        {} from {}: {} of {} bytes, {:.1} MiB/s",
            &t.hash[..16.min(t.hash.len())],
            t.peer,
            t.bytes,
            t.total,
            t.bytes_per_s / 1048576.0
        );
    }
    for a in &s.aggregating {
        println!(
            "aggregating:     round {} ({} inputs, try {})",
            a.round, a.inputs, a.attempt
        );
    }
    if !s.inbox_waiting.is_empty() {
        println!(
            "waiting:         {} handed-over adapters wait for the next round",
            s.inbox_waiting.len()
        );
    }
    match &s.latest_round {
        Some(r) => println!(
            "latest round:    {} {} {} ({} contributors)",
            r.number,
            r.version,
            r.hash,
            r.contributors.len()
        ),
        None => println!("latest round:    none yet"),
    }
    if let Some(p) = &s.privacy {
        println!(
            "privacy:         clip {} noise x{}: epsilon {:.3} a round, {:.3} over the {} rounds \
             this node released in (delta {:e})",
            p.clip,
            p.noise_multiplier,
            p.epsilon_per_round,
            p.epsilon_total,
            p.rounds_released,
            p.delta
        );
    }
    Ok(())
}
