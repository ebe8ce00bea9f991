//! Argument types shared by commands (flattened into each), and the helpers that go with
//! them. Commands import these and the library, never each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data_dir::{DataDir, RoundView, REFIT_COMMAND};
use crate::driver::NetRule;
use crate::node::{round_config, ChatSettings, GatewaySettings, LoraSettings, Node, NodeConfig};
use anyhow::{Context, Result};
use clap::Args;
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::dp::DpSettings;
use hivemind_protocol::RoundConfig;
use libp2p::{Multiaddr, PeerId};

/// Options shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base model: `default`, a GGUF file, a Hugging Face model dir, or a hub id in the local HF cache.
    #[arg(long, env = "HIVE_MODEL", default_value = "default")]
    pub model: String,
    /// Keep safetensors weights in f32 instead of quantizing them to 4 bits at load.
    #[arg(long)]
    pub no_4bit: bool,
    /// Compute threads (default: every CPU on machines with 2 or fewer, else half of them).
    #[arg(long, env = "HIVE_THREADS")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// Sets the compute thread count; must run before any tensor work.
    pub fn apply_threads(&self) {
        apply_threads(self.threads);
    }
}

/// Sets the compute thread count (`threads`, else [`default_threads`]); must run before any
/// tensor work.
pub fn apply_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(default_threads).max(1);
    // candle's CPU kernels read the same variable as rayon.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon_global(n);
}

fn rayon_global(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Every CPU on small machines (two threads decode 1.6-1.75x faster than one on a 2-vCPU VM), half
/// the logical CPUs on bigger ones, which are mostly hyper-threads sharing a core's units (as
/// llama.cpp counts physical cores).
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cores <= 2 {
        cores
    } else {
        cores / 2
    }
}

/// Progress lines for long work, on stderr.
pub fn progress(msg: &str) {
    eprintln!("hive-node: {msg}");
}

/// A progress bar on stderr for `total` units of `unit` ("step", "item"), with the bar's
/// message after the count and an ETA.
pub fn progress_bar(total: usize, unit: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total as u64);
    let template =
        format!("{{spinner}} [{{elapsed_precise}}] {{bar:30.cyan/blue}} {unit} {{pos}}/{{len}} {{msg}} ETA {{eta}}");
    let style = indicatif::ProgressStyle::with_template(&template)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb.enable_steady_tick(std::time::Duration::from_millis(250));
    pb
}

/// Resolves and loads the base model named by `args`.
pub fn load_model(args: &ModelArgs) -> Result<hivemind_model::BaseModel> {
    let spec = Some(args.model.as_str());
    let path: PathBuf = hivemind_model::pull::resolve_model(spec, &mut progress)?;
    let opts = hivemind_model::LoadOptions {
        no_4bit: args.no_4bit,
    };
    let model = hivemind_model::BaseModel::load(&path, &opts)?;
    Ok(model)
}

/// Where `train` writes by default and `chat --use personal` reads: the personal adapter.
pub const PERSONAL_ADAPTER: &str = "./adapters/my_adapter";

/// `--data-dir`: the node's data dir (identity key, store, status file, inbox).
#[derive(Debug, Clone, Args)]
pub struct DataDirArg {
    /// Data directory of the node (identity key, store, status file, inbox).
    #[arg(long, env = "HIVE_DATA_DIR", default_value_os_t = DataDir::default_path())]
    pub data_dir: PathBuf,
}

impl DataDirArg {
    /// The data dir.
    pub fn dir(&self) -> DataDir {
        DataDir::new(&self.data_dir)
    }
}

/// The options of a node (`join`, and `serve` beside its gateway options).
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Bootstrap peers (multiaddrs ending in /p2p/PEERID). None: this node is a bootstrap node.
    #[arg(long, env = "HIVE_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// Listen addresses (port 0 picks a free port).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/0,/ip4/0.0.0.0/udp/0/quic-v1"
    )]
    pub listen: Vec<Multiaddr>,
    /// Data directory.
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Collection window of a round, in seconds.
    #[arg(long, env = "HIVE_ROUND_SECS", default_value_t = 3600.0)]
    pub round_secs: f64,
    /// Quiet period after a round closes before it commits, in seconds (default: a third
    /// of the window, at most 300).
    #[arg(long, env = "HIVE_GRACE_SECS")]
    pub grace_secs: Option<f64>,
    /// Base model whose network to join: `default`, or a local GGUF file / HF model dir.
    #[arg(long, env = "HIVE_MODEL", default_value = "default")]
    pub model: String,
    /// A PEFT adapter dir to announce in the current round.
    #[arg(long)]
    pub contribute: Option<PathBuf>,
    /// Training samples behind the contributed adapter (its FedAvg weight).
    #[arg(long, default_value_t = 1)]
    pub samples: u64,
    /// LoRA rank of this network's adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha of this network's adapters.
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Adapted modules, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// How rounds merge adapters: `fedavg` (average A and B; users continue from the round
    /// adapter), or a rule that adds the merge of the users' updates to the round adapter
    /// (`exact-mean`, `iso`, `tsv`, `geomedian`; users train updates on top of it). `iso`
    /// learns the most; `geomedian` (the geometric median of the updates) also keeps a
    /// colluding minority from choosing where the round moves. Part of the network's identity.
    #[arg(long, default_value = "iso")]
    pub rule: NetRule,
    /// Differential privacy (opt-in, part of the network's identity): every contributor's
    /// adapter is clipped to L2 norm --dp-clip and Gaussian noise of this many times the clip
    /// is added to each value before it is announced; `status` reports ε.
    #[arg(long)]
    pub dp_noise: Option<f64>,
    /// The L2 norm adapters are clipped to under --dp-noise.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// The δ that ε is reported for under --dp-noise.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Sybil cost (opt-in, part of the network's identity): what a key signs counts only if
    /// the key carries this many bits of proof of work (its hash starts with as many zero
    /// bits), so every key the network weighs took about 2^BITS key generations to make.
    /// A new data dir makes such a key at first start (20 bits: about half a minute of one
    /// core, on average); a node whose key has less refuses to start (its peers would refuse
    /// and ban it). At most 32.
    #[arg(long, env = "HIVE_KEY_WORK", default_value_t = 0)]
    pub key_work: u32,
    /// Discover peers on the LAN with mDNS.
    #[arg(long)]
    pub mdns: bool,
    /// Relay for nodes behind NATs (circuit relay v2): for a node others can reach, such as a
    /// bootstrap node on a public address. At most 128 reservations (4 per peer), 32 circuits
    /// (4 per peer), 64 MiB and 10 minutes per circuit. Nodes behind a NAT listen through
    /// relays by themselves and try to connect directly (hole punching) when they meet.
    #[arg(long)]
    pub relay: bool,
    /// A closed network: the peer ids of its other members (repeat, or separate with commas;
    /// `hive-node identity` prints a node's). This node connects with no one else and ignores
    /// messages signed by anyone else. Without it the network is open.
    #[arg(long = "allow-peer", env = "HIVE_ALLOW_PEERS", value_delimiter = ',')]
    pub allow_peers: Vec<PeerId>,
    /// Megabytes to keep free on the data dir's disk: peers' adapters and gateway uploads
    /// that would go below it are not taken in (uploads get 507) until space returns.
    #[arg(long, env = "HIVE_MIN_FREE_MB", default_value_t = 512)]
    pub min_free_mb: u64,
    /// Serve the dashboard (`/ui/`) and the OpenAI-compatible chat API (`/v1/...`) on this
    /// address; `--http` alone means 127.0.0.1:8080 (`serve` also serves them on its port).
    #[arg(long, env = "HIVE_HTTP", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    pub http: Option<String>,
    /// A key (at least 16 characters) the chat API and the dashboard's data then need:
    /// OpenAI clients send it as their api_key (`Authorization: Bearer`), the dashboard asks
    /// for it once. Without it they answer whoever reaches them (only this machine unless
    /// `--http` binds another address or `serve --web-public`).
    #[arg(long, env = "HIVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The personal adapter the chat API offers as model `personal` (when `train` made it
    /// for this network's base model).
    #[arg(long, default_value = PERSONAL_ADAPTER)]
    pub personal: PathBuf,
    /// Compute threads for chat (default: every CPU on machines with 2 or fewer, else half of
    /// them).
    #[arg(long, env = "HIVE_THREADS")]
    pub threads: Option<usize>,
}

impl NodeArgs {
    /// The LoRA shape of `--rank`, `--alpha`, `--target-modules`.
    pub fn lora(&self) -> LoraSettings {
        LoraSettings {
            rank: self.rank,
            alpha: self.alpha,
            target_modules: self.target_modules.clone(),
            rule: self.rule,
            dp: self.dp_noise.map(|z| DpSettings {
                clip: self.dp_clip,
                noise_multiplier: z,
                delta: self.dp_delta,
            }),
            key_work: self.key_work,
        }
    }

    /// Sets the compute thread count (`--threads`); must run before any tensor work.
    pub fn apply_threads(&self) {
        apply_threads(self.threads);
    }

    /// The round timing of `--round-secs` and `--grace-secs`.
    pub fn round(&self) -> RoundConfig {
        round_config(self.round_secs, self.grace_secs)
    }

    /// Starts a node from the command line's options (and a gateway, for `serve`), prints its
    /// addresses, contributes `--contribute`, and runs until Ctrl-C or SIGTERM.
    pub async fn run_node(self, gateway: Option<GatewaySettings>, web_public: bool) -> Result<()> {
        let args = self;
        let serves_chat = gateway.is_some() || args.http.is_some();
        let api_key = match &args.api_key {
            Some(k) => Some(Arc::new(crate::web::ApiKey::new(k).context("--api-key")?)),
            None => None,
        };
        let spec = args.model.clone();
        let model = tokio::task::spawn_blocking(move || {
            hivemind_model::pull::resolve_model(Some(&spec), &mut progress)
        })
        .await??;
        let node = Node::start(NodeConfig {
            data_dir: args.data_dir.dir(),
            model,
            lora: args.lora(),
            listen: args.listen.clone(),
            bootstrap: args.bootstrap.clone(),
            round: args.round(),
            mdns: args.mdns,
            serve_limit: crate::net::blob::DEFAULT_SERVE_LIMIT,
            retain_rounds: crate::driver::RETAIN_ROUNDS,
            gateway,
            chat: serves_chat.then(|| ChatSettings {
                personal: Some(args.personal.clone()),
                gateway_public: web_public,
                api_key: api_key.clone(),
            }),
            http: args.http.clone(),
            allow_peers: (!args.allow_peers.is_empty())
                .then(|| args.allow_peers.iter().copied().collect()),
            relay: args.relay,
            min_free_bytes: args.min_free_mb.saturating_mul(1 << 20),
        })
        .await
        .context("starting the node")?;
        for a in node.listen_addrs() {
            println!("listening on {a}");
        }
        println!("model id {}", node.model_id().to_hex());
        if let Some(addr) = node.gateway_addr() {
            println!("gateway on http://{addr}");
            let who = if web_public {
                ""
            } else {
                " (for clients on this machine)"
            };
            println!("dashboard on http://{addr}/ui/, chat API on http://{addr}/v1{who}");
        }
        if let Some(addr) = node.http_addr() {
            println!("dashboard on http://{addr}/ui/, chat API on http://{addr}/v1");
        }
        let reachable = web_public && node.gateway_addr().is_some()
            || node.http_addr().is_some_and(|a| !a.ip().is_loopback());
        if reachable && api_key.is_none() {
            eprintln!(
                "hive-node: warning: the dashboard and the chat API answer every client that \
                 reaches them; set --api-key to require a key"
            );
        }
        if let Some(dir) = args.contribute.clone() {
            match node.contribute(dir, args.samples).await {
                Ok(h) => println!("contributed {}", h.to_hex()),
                Err(e) => {
                    node.shutdown().await;
                    return Err(e).context("--contribute");
                }
            }
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        node.shutdown().await;
        Ok(())
    }
}

/// `--adapter`, `--use` and `--data-dir`: which adapters a command that runs the model applies.
#[derive(Debug, Clone, Args)]
pub struct AdapterArgs {
    /// A PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors); wins over --use.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Which adapter to use when --adapter is not given: `round` (the latest round adapter of
    /// the node in --data-dir), `personal` (./adapters/my_adapter, what `train` writes by
    /// default), `round+personal` (both at once: their updates add up), `none` (the base
    /// model), or `auto` (the round adapter when the data dir's network runs this base model,
    /// plus the personal adapter when `train` made it for this base model).
    #[arg(long = "use", value_enum, default_value_t = AdapterChoice::Auto)]
    pub use_adapter: AdapterChoice,
    /// The node's data dir (where round adapters are found).
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

impl AdapterArgs {
    /// Applies the chosen adapters (none, one, or several stacked into one) to `model`'s
    /// decoder; returns their dirs.
    pub fn apply(&self, model: &mut hivemind_model::BaseModel) -> Result<Vec<PathBuf>> {
        let dirs = match &self.adapter {
            Some(dir) => vec![dir.clone()],
            None => choose_adapters(self.use_adapter, &self.data_dir.dir(), &model.hash)?,
        };
        let adapters = dirs
            .iter()
            .map(|dir| {
                LoraAdapter::read_dir(dir)
                    .with_context(|| format!("loading adapter {}", dir.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let names = || {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let applied = match adapters.as_slice() {
            [] => return Ok(dirs),
            [one] => one.clone(),
            many => hivemind_model::aggregate::stack(&many.iter().collect::<Vec<_>>())
                .with_context(|| format!("combining adapters {}", names()))?,
        };
        model
            .decoder
            .apply_adapter(&applied)
            .with_context(|| format!("applying adapter {}", names()))?;
        Ok(dirs)
    }
}

/// Which adapters a command that runs the model (`chat`, `eval`) applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterChoice {
    /// The round adapter if the data dir's network runs this base model, and the personal
    /// adapter if it was trained on this base model: whichever exist.
    Auto,
    /// The latest round adapter of the node's data dir.
    Round,
    /// The personal adapter `train` writes by default.
    Personal,
    /// The round adapter and the personal adapter together.
    #[value(name = "round+personal")]
    RoundPersonal,
    /// The base model alone.
    None,
}

fn personal_adapter() -> Result<PathBuf> {
    let dir = PathBuf::from(PERSONAL_ADAPTER);
    anyhow::ensure!(
        dir.exists(),
        "no personal adapter at {PERSONAL_ADAPTER} (train one with `hive-node train`)"
    );
    Ok(dir)
}

fn round_adapter(
    data_dir: &DataDir,
    base_hash: &hivemind_protocol::Hash,
) -> Result<(RoundView, PathBuf)> {
    anyhow::ensure!(
        data_dir.network_runs(base_hash),
        "the node in {} is not on a network of this base model (join one first)",
        data_dir.path().display()
    );
    let (round, dir) = data_dir
        .latest_round_adapter()?
        .with_context(|| format!("no committed round in {} yet", data_dir.path().display()))?;
    say_using_round(&round);
    Ok((round, dir))
}

fn say_using_round(round: &RoundView) {
    progress(&format!(
        "using round adapter {} ({})",
        round.version,
        round.hash.get(..16).unwrap_or(&round.hash)
    ));
}

/// Says so when the personal adapter at `personal` does not fit `round`'s adapter applied
/// under it ([`DataDir::personal_misfit`]).
fn check_personal_fits(data_dir: &DataDir, personal: &Path, round: &RoundView) {
    if let Some(why) = data_dir.personal_misfit(personal, round) {
        progress(&format!(
            "{why}; refit it to this round with `{REFIT_COMMAND} --data-dir {} --output {}` \
             (and your --model, if not the default)",
            data_dir.path().display(),
            personal.display()
        ));
    }
}

/// The adapter dirs to apply for `choice`, given the loaded base model's hash.
fn choose_adapters(
    choice: AdapterChoice,
    data_dir: &DataDir,
    base_hash: &hivemind_protocol::Hash,
) -> Result<Vec<PathBuf>> {
    match choice {
        AdapterChoice::None => Ok(vec![]),
        AdapterChoice::Personal => {
            let personal = personal_adapter()?;
            if let Some(why) = data_dir.personal_wants_round(&personal) {
                progress(&why);
            }
            Ok(vec![personal])
        }
        AdapterChoice::Round => Ok(vec![round_adapter(data_dir, base_hash)?.1]),
        AdapterChoice::RoundPersonal => {
            let (round, dir) = round_adapter(data_dir, base_hash)?;
            let personal = personal_adapter()?;
            check_personal_fits(data_dir, &personal, &round);
            Ok(vec![dir, personal])
        }
        AdapterChoice::Auto => {
            let mut dirs = Vec::new();
            let mut round = None;
            if data_dir.network_runs(base_hash) {
                if let Ok(Some((view, dir))) = data_dir.latest_round_adapter() {
                    say_using_round(&view);
                    dirs.push(dir);
                    round = Some(view);
                }
            }
            let personal = PathBuf::from(PERSONAL_ADAPTER);
            if hivemind_model::train::TrainingInfo::trained_on(&personal, base_hash) {
                progress(&format!("using your personal adapter {PERSONAL_ADAPTER}"));
                if let Some(round) = &round {
                    check_personal_fits(data_dir, &personal, round);
                }
                dirs.push(personal);
            }
            if !dirs.is_empty() {
                progress("(--use none for the base model alone)");
            }
            Ok(dirs)
        }
    }
}
