//! `hive-node serve`: a node with the legacy REST gateway.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::args::NodeArgs;
use crate::gateway::{GatewayAuth, GatewayConfig};
use crate::node::GatewaySettings;

/// Arguments of `hive-node serve`: a node with the legacy REST gateway.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Node options (as for `join`; without --bootstrap this is a bootstrap node).
    #[command(flatten)]
    pub node: NodeArgs,
    /// Address the HTTP gateway binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port of the HTTP gateway (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Largest upload in MiB (request body, and the inflated content of a zip).
    #[arg(long, default_value_t = 512)]
    pub max_upload_mb: u64,
    /// Longest a request may take, upload included, in seconds.
    #[arg(long, default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// How long POST /api/v1/aggregate waits for the round to commit, in seconds.
    #[arg(long, default_value_t = 240)]
    pub aggregate_wait_secs: u64,
    /// Operator token: when set, POST /api/v1/aggregate needs `Authorization: Bearer TOKEN`
    /// (at least 16 characters).
    #[arg(long, env = "HIVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A JSON file `{"user id": "token", ...}`: when given, an upload needs the bearer token of
    /// its user_id, and user ids not in the file cannot upload. Without it the gateway is
    /// open, as the legacy server was.
    #[arg(long)]
    pub user_tokens: Option<std::path::PathBuf>,
    /// Most HTTP connections served at once; more wait until one closes. A request's header
    /// must arrive within 10 s.
    #[arg(long, default_value_t = GatewayConfig::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most uploads one client address may make in a minute (0: no limit); more get 429.
    #[arg(long, default_value_t = GatewayConfig::UPLOADS_PER_MINUTE)]
    pub uploads_per_minute: u32,
    /// Most uploads one user_id may make in a minute, from any address (0: no limit); more get
    /// 429.
    #[arg(long, default_value_t = GatewayConfig::USER_UPLOADS_PER_MINUTE)]
    pub user_uploads_per_minute: u32,
    /// Serve the dashboard (/ui/) and the chat API (/v1/) on the gateway's port to every
    /// client; without it they answer only clients on this machine.
    #[arg(long)]
    pub web_public: bool,
    /// Accepted for compatibility with the legacy server's CLI and ignored: there is no
    /// code to reload.
    #[arg(long)]
    pub reload: bool,
}

/// Runs `hive-node serve`.
pub(super) fn run(args: ServeArgs) -> Result<()> {
    args.node.apply_threads();
    let users = match &args.user_tokens {
        Some(path) => Some(GatewayAuth::read_user_tokens(path)?),
        None => None,
    };
    let auth = GatewayAuth::new(args.admin_token.as_deref(), users)?;
    let gateway = GatewaySettings {
        bind: if args.host.contains(':') {
            format!("[{}]:{}", args.host, args.port)
        } else {
            format!("{}:{}", args.host, args.port)
        },
        config: GatewayConfig {
            max_upload_bytes: args.max_upload_mb.saturating_mul(1 << 20),
            request_timeout: Duration::from_secs(args.request_timeout_secs),
            aggregate_wait: Duration::from_secs(args.aggregate_wait_secs),
            auth,
            max_connections: args.max_connections,
            header_timeout: GatewayConfig::HEADER_TIMEOUT,
            uploads_per_minute: args.uploads_per_minute,
            user_uploads_per_minute: args.user_uploads_per_minute,
        },
    };
    super::runtime()?.block_on(args.node.run_node(Some(gateway), args.web_public))
}
