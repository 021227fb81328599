//! upkeepctl: the operator's command line. Parsing (clap) and rendering live here; the binary is a thin main.
//!
//! Every read command renders as a table or, with `-o json`, as JSON with the stable field names documented in
//! docs/cli-json.md. Every failure becomes one readable line and a non-zero exit (see the binary).

pub mod dashboard;
pub mod maintenance;
pub mod output;
pub mod runs;
pub mod webhooks;
pub mod yaml;

use crate::pki;
use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint};
use upkeep_core::ids::Role;
use upkeep_proto::tls::{ClientFiles, client_tls};
use upkeep_proto::v1;
use upkeep_proto::v1::operator_service_client::OperatorServiceClient;

/// Default hub address.
pub const DEFAULT_HUB: &str = "https://localhost:7443";

/// upkeepctl: operate an upkeep fleet.
#[derive(Debug, Parser)]
#[command(name = "upkeepctl", version, about = "Operate an upkeep fleet: nodes, members, update runs, PKI")]
pub struct Cli {
    /// Hub address, e.g. https://hub.example:7443; several replicas comma-separated (tried in order until one
    /// answers).
    #[arg(long, global = true, env = "UPKEEP_HUB", default_value = DEFAULT_HUB)]
    pub hub: String,
    /// Fleet CA certificate (PEM).
    #[arg(long, global = true, env = "UPKEEP_CA")]
    pub ca: Option<PathBuf>,
    /// Operator or viewer certificate (PEM).
    #[arg(long, global = true, env = "UPKEEP_CERT")]
    pub cert: Option<PathBuf>,
    /// Key of that certificate (PEM).
    #[arg(long, global = true, env = "UPKEEP_KEY")]
    pub key: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON with stable field names (docs/cli-json.md).
    Json,
    /// The same fields as YAML.
    Yaml,
}

impl Format {
    /// JSON or YAML: the machine-readable forms with stable field names.
    pub fn is_structured(self) -> bool {
        matches!(self, Format::Json | Format::Yaml)
    }
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the fleet CA and certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Nodes of the fleet.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Members (sets of nodes upgraded as one unit).
    #[command(subcommand)]
    Member(MemberCommand),
    /// Node image catalog.
    #[command(subcommand)]
    Image(runs::ImageCommand),
    /// Kubernetes releases and their regions.
    #[command(subcommand)]
    Kubernetes(runs::KubernetesCommand),
    /// Strategies: named, reusable orders of stages and groups.
    #[command(subcommand)]
    Strategy(runs::StrategyCommand),
    /// Update runs.
    #[command(subcommand)]
    Run(runs::RunCommand),
    /// Security patches for the SecurityPatch channel.
    #[command(subcommand)]
    Patch(maintenance::PatchCommand),
    /// Disruption leases (nodes out of service with the hub's permission).
    #[command(subcommand)]
    Lease(maintenance::LeaseCommand),
    /// Advance notice: what will happen in the fleet (update run members, channel rollouts, reboots) and the
    /// earliest each can start, taking windows, freeze dates, the cadence and budgets into account.
    Schedule(maintenance::ScheduleArgs),
    /// CloudEvents webhooks: fleet events POSTed to receivers (docs/webhooks.md).
    #[command(subcommand)]
    Webhook(webhooks::WebhookCommand),
    /// Serve a read-only web dashboard of the fleet on this machine (loopback), asking the hub as you.
    Dashboard(dashboard::DashboardArgs),
    /// Show who the hub thinks you are.
    Whoami,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages for upkeepctl and every subcommand into DIR.
    Man {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `upkeepctl pki ...`
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write a fleet root CA (ca.pem, ca.key), an issuing intermediate CA under it (issuer.pem, issuer.key), a hub
    /// certificate, one operator and one viewer certificate into DIR, and print the root's SHA-256 fingerprint
    /// (for `upkeep-agent join --ca-fingerprint`). Leaves are signed by the intermediate: after init, move ca.key
    /// offline (the hub needs only issuer.pem/issuer.key to sign certificates for joining nodes).
    Init {
        /// Directory to write into (created if missing; an existing CA is never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Names the hub is reached by (DNS names or IP addresses); default localhost and 127.0.0.1.
        #[arg(long = "hub-name")]
        hub_names: Vec<String>,
    },
    /// Issue a node certificate (node-NAME.pem, node-NAME.key) with the CA in DIR (the intermediate if DIR has one).
    IssueNode(IssueArgs),
    /// Issue an operator certificate (read and write).
    IssueOperator(IssueArgs),
    /// Issue a viewer certificate (read only).
    IssueViewer(IssueArgs),
    /// Revoke a certificate by serial: the hub refuses it from now on (at the TLS handshake, and at an agent
    /// session's start), across restarts. `openssl x509 -serial -noout -in CERT` prints a certificate's serial.
    Revoke {
        /// Serial in hex (`serial=` prefix and colons accepted).
        serial: String,
        /// Why (kept with the revocation and shown by `pki revoked`).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the certificates the hub refuses.
    Revoked,
    /// How long certificates have left: every certificate in DIR, or without --dir the ones this upkeepctl is
    /// configured with (--ca, --cert). Those within 14 days of expiry (or past it) are marked and warned about.
    Status {
        /// A PKI directory (e.g. the one `pki init` wrote).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Join tokens for `upkeep-agent join` (ask the hub; operator role).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the SHA-256 fingerprint of the fleet CA in DIR (ca.pem): what `upkeep-agent join --ca-fingerprint`
    /// wants.
    Fingerprint {
        /// Directory holding ca.pem.
        #[arg(long)]
        dir: PathBuf,
    },
}

impl PkiCommand {
    /// Whether the command works on local files only (the others ask the hub).
    pub fn is_local(&self) -> bool {
        !matches!(self, PkiCommand::Revoke { .. } | PkiCommand::Revoked | PkiCommand::Token(_))
    }
}

/// `upkeepctl pki token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print it (once: the hub keeps only a hash). On the node:
    /// `upkeep-agent join --hub URL --token TOKEN --ca-fingerprint FP` (`upkeepctl pki fingerprint --dir DIR`).
    Create {
        /// The member joining nodes belong to.
        #[arg(long)]
        member: String,
        /// Their node pool (default: default).
        #[arg(long, default_value = "")]
        pool: String,
        /// How long the token is accepted: seconds, or with a unit (90s, 30m, 1h, 2d); at most 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List join tokens (never their secrets).
    List,
    /// Revoke a join token by id: it is refused from now on.
    Revoke {
        /// The token's id (the part after upkeep-join- and before the dot).
        id: String,
    },
}

/// Parses `--ttl`: seconds, or a number with s, m, h or d.
pub fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("--ttl {text:?}: unknown unit: give seconds or a number with s, m, h or d, e.g. --ttl 1h"),
    };
    let n: u64 = num.parse().map_err(|_| anyhow!("--ttl {text:?}: not a duration: give e.g. --ttl 1h or --ttl 90s"))?;
    if n == 0 {
        bail!("--ttl {text:?}: must be more than zero, e.g. --ttl 1h");
    }
    Ok(n.saturating_mul(per))
}

/// Arguments of the issue commands.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Directory holding the CA (issuer.pem/issuer.key, or ca.pem/ca.key); the new files are written there.
    #[arg(long)]
    pub dir: PathBuf,
    /// Name carried in the certificate (node name for nodes).
    #[arg(long)]
    pub name: String,
    /// Validity in days (default: 30 for a node, which renews its certificate over its session at 2/3 of its
    /// life; 397 for operators and viewers; at most 825).
    #[arg(long)]
    pub days: Option<i64>,
}

/// `upkeepctl node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes with their node-image-version label, member, pool, region, channel and last seen.
    List {
        /// Only nodes of this member.
        #[arg(long)]
        member: Option<String>,
    },
    /// Show one node in full.
    Show {
        /// Node name.
        name: String,
    },
    /// Remove a node from the inventory (it reappears if it reports again).
    Forget {
        /// Node name.
        name: String,
    },
    /// Coordinated reboot: the hub takes a lease for the node within its member's budget, then cordons, drains,
    /// reboots and uncordons it.
    Reboot {
        /// Node name.
        name: String,
        /// Reboot outside the node OS window (the disruption budget still holds).
        #[arg(long)]
        force: bool,
    },
    /// Put a node a failed step left cordoned back in service: uncordon it and give back its leases.
    Uncordon {
        /// Node name.
        name: String,
    },
}

/// `upkeepctl member ...`
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// List members.
    List,
    /// Show one member with its channels.
    Show {
        /// Member name.
        name: String,
    },
    /// Set the node OS upgrade channel: None, Unmanaged, SecurityPatch or NodeImage.
    SetChannel {
        /// Member name.
        member: String,
        /// The channel.
        channel: String,
    },
    /// Set the cluster auto-upgrade channel: none, patch, stable, rapid or node-image.
    SetAutoUpgrade {
        /// Member name.
        member: String,
        /// The channel.
        channel: String,
    },
    /// Set or clear a maintenance window (a MaintenanceSchedule JSON file; see docs/schedules.md).
    SetWindow {
        /// Member name.
        member: String,
        /// node-os (node OS channel and NodeImageOnly runs) or cluster (Full and ControlPlaneOnly runs).
        #[arg(long, default_value = "node-os")]
        kind: String,
        /// Schedule file.
        #[arg(short = 'f', long = "file", conflicts_with = "clear")]
        file: Option<PathBuf>,
        /// Remove the window (the member may be upgraded any time).
        #[arg(long)]
        clear: bool,
    },
    /// Set how many nodes of a pool are upgraded at once: a count ("1") or a percentage ("25%").
    SetMaxUnavailable {
        /// Member name.
        member: String,
        /// Count or percentage.
        value: String,
    },
    /// Set the drain timeout and what an undrainable node leads to (Fail, SkipNode, Force).
    SetDrain {
        /// Member name.
        member: String,
        /// How long one drain may take, seconds (1 to 86400).
        #[arg(long)]
        timeout: Option<u32>,
        /// Fail (default): the node fails the work; SkipNode: it is left as it is and the work goes on;
        /// Force: it is drained again ignoring disruption budgets.
        #[arg(long)]
        undrainable: Option<String>,
        /// How many nodes one piece of work may skip or force before an undrainable node fails it.
        #[arg(long)]
        max_undrainable: Option<u32>,
    },
}

/// Connects to the hub over mutual TLS with the configured certificate.
pub async fn connect(cli: &Cli) -> anyhow::Result<OperatorServiceClient<Channel>> {
    let missing = |flag: &str, env: &str| {
        anyhow!("--{flag} is required (or set {env}); `upkeepctl pki init` writes the files you need")
    };
    let files = ClientFiles {
        ca: cli.ca.clone().ok_or_else(|| missing("ca", "UPKEEP_CA"))?,
        cert: cli.cert.clone().ok_or_else(|| missing("cert", "UPKEEP_CERT"))?,
        key: cli.key.clone().ok_or_else(|| missing("key", "UPKEEP_KEY"))?,
        settings: ["--ca".into(), "--cert".into(), "--key".into()],
    };
    let hubs: Vec<&str> = cli.hub.split(',').filter(|h| !h.trim().is_empty()).collect();
    let hubs = upkeep_proto::tls::hub_endpoints(&hubs).map_err(|e| anyhow!("--hub {e}"))?;
    // Replicas are tried in order; a certificate refusal is final (another replica would refuse it too), an
    // unreachable replica moves on to the next.
    let mut unreachable = Vec::new();
    for hub in &hubs {
        let tls = client_tls(&files, &hub.host)?;
        let endpoint = Endpoint::from_shared(hub.url.clone())
            .map_err(|e| anyhow!("--hub {}: {e}", hub.url))?
            .tls_config(tls)
            .map_err(|e| anyhow!("--hub {}: {e}", hub.url))?
            .connect_timeout(std::time::Duration::from_secs(if hubs.len() > 1 { 5 } else { 10 }))
            .tcp_nodelay(true);
        match endpoint.connect().await {
            Ok(channel) => return Ok(OperatorServiceClient::new(channel)),
            Err(e) => match upkeep_proto::tls::explain_refusal(&e, "--cert", "--ca") {
                Some(why) => bail!("{}: {why}", hub.url),
                None => unreachable.push(format!("{}: {}", hub.url, error_chain(&e))),
            },
        }
    }
    Err(anyhow::Error::new(ConnectionLost(format!("cannot reach hub at {}", unreachable.join("; ")))))
}

/// Normalises a hub address to an https URL and the host name its certificate must carry.
pub fn hub_url(hub: &str) -> anyhow::Result<(String, String)> {
    upkeep_proto::tls::hub_endpoint(hub).map_err(|e| anyhow!("--hub {e}"))
}

/// An error and its causes on one line.
pub use upkeep_proto::error_chain;

/// Turns a gRPC status into one line.
pub fn status_line(s: tonic::Status) -> anyhow::Error {
    if let Some(why) = upkeep_proto::tls::explain_refusal(&s, "--cert", "--ca") {
        return anyhow!("{why}");
    }
    let line = format!("hub refused: {:?}: {}", s.code(), s.message().replace('\n', " "));
    // Cancelled or Unknown without an answer from the hub: the connection broke under the call.
    let lost = matches!(s.code(), tonic::Code::Cancelled | tonic::Code::Unavailable)
        || (s.code() == tonic::Code::Unknown && s.message().contains("transport error"));
    if lost { anyhow::Error::new(ConnectionLost(line)) } else { anyhow!(line) }
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let result = run_command(&cli, out).await;
    // A call that failed below gRPC (the connection went away) may be the hub refusing this client's
    // certificate: ask the hub directly, and if so say which certificate and why instead.
    if let Err(e) = &result
        && e.downcast_ref::<ConnectionLost>().is_some()
        && let (Some(ca), Some(cert), Some(key)) = (cli.ca.clone(), cli.cert.clone(), cli.key.clone())
    {
        let files = ClientFiles { ca, cert, key, settings: ["--ca".into(), "--cert".into(), "--key".into()] };
        if let Some(why) = upkeep_proto::tls::probe_refusal(&cli.hub, &files).await {
            return Err(anyhow!("{why}"));
        }
    }
    result
}

/// A call that failed because the connection to the hub failed (not an answer from the hub).
#[derive(Debug)]
pub struct ConnectionLost(String);

impl std::fmt::Display for ConnectionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectionLost {}

async fn run_command(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    match &cli.command {
        Command::Pki(PkiCommand::Status { dir }) => pki_status(cli, dir.as_deref(), out),
        Command::Pki(cmd) if cmd.is_local() => run_pki(cmd, cli.output, out),
        Command::Pki(PkiCommand::Token(cmd)) => tokens(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Pki(cmd) => revocations(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "upkeepctl", &mut buf);
            out.write_all(&buf)?;
            Ok(())
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("--dir {}: cannot create", dir.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("--dir {}: writing man pages", dir.display()))?;
            writeln!(out, "man pages written to {}", dir.display())?;
            Ok(())
        }
        Command::Dashboard(args) => dashboard::serve(cli, args, out).await,
        Command::Whoami => {
            let me = connect(cli).await?.who_am_i(v1::WhoAmIRequest {}).await.map_err(status_line)?.into_inner();
            output::print_whoami(cli.output, &me, out)
        }
        Command::Node(cmd) => {
            let mut c = connect(cli).await?;
            match cmd {
                NodeCommand::List { member } => {
                    let req = v1::ListNodesRequest { member: member.clone().unwrap_or_default() };
                    let nodes = c.list_nodes(req).await.map_err(status_line)?.into_inner().nodes;
                    output::print_nodes(cli.output, &nodes, chrono::Utc::now(), out)
                }
                NodeCommand::Show { name } => {
                    let node = c.get_node(v1::GetNodeRequest { name: name.clone() }).await.map_err(status_line)?;
                    output::print_node(cli.output, &node.into_inner(), chrono::Utc::now(), out)
                }
                NodeCommand::Forget { name } => {
                    let r = c.forget_node(v1::ForgetNodeRequest { name: name.clone() }).await.map_err(status_line)?;
                    let r = r.into_inner();
                    if !r.existed && r.revoked.is_empty() {
                        bail!("node {name:?} not found; see `upkeepctl node list`");
                    }
                    writeln!(out, "node {name} forgotten")?;
                    for c in &r.revoked {
                        writeln!(out, "certificate {} revoked", c.serial)?;
                    }
                    Ok(())
                }
                NodeCommand::Reboot { name, force } => maintenance::reboot(&mut c, name, *force, cli.output, out).await,
                NodeCommand::Uncordon { name } => maintenance::uncordon(&mut c, name, out).await,
            }
        }
        Command::Image(cmd) if cmd.is_local() => runs::image_local(cmd, out),
        Command::Image(cmd) => runs::image(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Kubernetes(cmd) => runs::kubernetes(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Strategy(cmd) => runs::strategy(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Patch(cmd) => maintenance::patch(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Lease(cmd) => maintenance::lease(&mut connect(cli).await?, cmd, cli.output, out).await,
        Command::Schedule(args) => maintenance::schedule(&mut connect(cli).await?, args, cli.output, out).await,
        Command::Webhook(cmd) => webhooks::webhook(|| connect(cli), cmd, cli.output, out).await,
        Command::Run(cmd) => {
            if runs::run(&mut connect(cli).await?, cmd, cli.output, out).await? {
                Ok(())
            } else {
                bail!("the run ended Failed; see `upkeepctl run show`")
            }
        }
        Command::Member(cmd) => {
            let mut c = connect(cli).await?;
            match cmd {
                MemberCommand::List => {
                    let members = c.list_members(v1::ListMembersRequest {}).await.map_err(status_line)?;
                    output::print_members(cli.output, &members.into_inner().members, out)
                }
                MemberCommand::Show { name } => {
                    let m = c.get_member(v1::GetMemberRequest { name: name.clone() }).await.map_err(status_line)?;
                    let s = c
                        .get_member_settings(v1::GetMemberRequest { name: name.clone() })
                        .await
                        .map_err(status_line)?;
                    output::print_member(cli.output, &m.into_inner(), &s.into_inner(), out)
                }
                MemberCommand::SetWindow { member, kind, file, clear } => {
                    runs::member_settings(&mut c, member, Some(kind), file.as_deref(), *clear, None, out).await
                }
                MemberCommand::SetMaxUnavailable { member, value } => {
                    runs::member_settings(&mut c, member, None, None, false, Some(value), out).await
                }
                MemberCommand::SetDrain { member, timeout, undrainable, max_undrainable } => {
                    runs::member_drain(&mut c, member, *timeout, undrainable.as_deref(), *max_undrainable, out).await
                }
                MemberCommand::SetChannel { member, channel } => {
                    let req = v1::SetMemberChannelRequest { member: member.clone(), channel: channel.clone() };
                    let m = c.set_member_channel(req).await.map_err(status_line)?.into_inner();
                    writeln!(
                        out,
                        "member {} node OS channel is {} (generation {})",
                        m.name, m.node_os_channel, m.config_generation
                    )?;
                    Ok(())
                }
                MemberCommand::SetAutoUpgrade { member, channel } => {
                    let req = v1::SetAutoUpgradeChannelRequest { member: member.clone(), channel: channel.clone() };
                    let m = c.set_auto_upgrade_channel(req).await.map_err(status_line)?.into_inner();
                    writeln!(
                        out,
                        "member {} auto-upgrade channel is {}; node OS channel {}",
                        m.name, m.auto_upgrade_channel, m.node_os_channel
                    )?;
                    Ok(())
                }
            }
        }
    }
}

/// `pki revoke` and `pki revoked`: the hub's list of refused certificates.
async fn revocations(
    c: &mut OperatorServiceClient<tonic::transport::Channel>,
    cmd: &PkiCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let list = match cmd {
        PkiCommand::Revoke { serial, reason } => {
            let r = c
                .revoke_certificate(v1::RevokeCertificateRequest { serial: serial.clone(), reason: reason.clone() })
                .await
                .map_err(status_line)?
                .into_inner();
            if !format.is_structured() {
                writeln!(out, "certificate {} revoked", r.serial)?;
                return Ok(());
            }
            vec![r]
        }
        _ => {
            c.list_revoked_certificates(v1::ListRevokedCertificatesRequest {})
                .await
                .map_err(status_line)?
                .into_inner()
                .certificates
        }
    };
    output::print_revoked(format, &list, out)
}

/// `pki status`.
fn pki_status(cli: &Cli, dir: Option<&std::path::Path>, out: &mut dyn Write) -> anyhow::Result<()> {
    use crate::certstatus::{WARN_DAYS, status_of_dir, status_of_pem};
    let now = chrono::Utc::now().timestamp();
    let all = match dir {
        Some(d) => status_of_dir(d, now, WARN_DAYS).map_err(|e| anyhow!(e))?,
        None => {
            let files: Vec<(&str, &PathBuf)> = [("--ca", cli.ca.as_ref()), ("--cert", cli.cert.as_ref())]
                .into_iter()
                .filter_map(|(f, p)| Some((f, p?)))
                .collect();
            if files.is_empty() {
                bail!(
                    "pki status: give --dir DIR, or --ca/--cert (UPKEEP_CA, UPKEEP_CERT) to check this client's files"
                );
            }
            files
                .iter()
                .map(|(flag, p)| {
                    let pem = std::fs::read(p).map_err(|e| anyhow!("{flag} {}: {e}", p.display()))?;
                    status_of_pem(p, &pem, now, WARN_DAYS).map_err(|e| anyhow!("{flag} {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        }
    };
    for s in all.iter().filter(|s| s.state != "ok") {
        eprintln!("warning: {} ({}) {} {}", s.file.display(), s.subject, s.state, s.not_after);
    }
    if cli.output.is_structured() {
        return output::emit(cli.output, out, &all);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.file.display().to_string(),
                s.subject.clone(),
                s.not_after.clone(),
                s.days_left.to_string(),
                s.state.to_string(),
                s.serial.clone(),
            ]
        })
        .collect();
    output::table(out, &["FILE", "SUBJECT", "NOT AFTER", "DAYS LEFT", "STATE", "SERIAL"], &rows)?;
    Ok(())
}

/// `pki token create|list|revoke`.
async fn tokens(
    c: &mut OperatorServiceClient<tonic::transport::Channel>,
    cmd: &TokenCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { member, pool, ttl, uses } => {
            let ttl_seconds = parse_ttl(ttl)?;
            if *uses == 0 {
                bail!("--uses 0: a token must allow at least one join, e.g. --uses 1");
            }
            let req =
                v1::CreateJoinTokenRequest { member: member.clone(), pool: pool.clone(), ttl_seconds, uses: *uses };
            let r = c.create_join_token(req).await.map_err(status_line)?.into_inner();
            let t = r.token.unwrap_or_default();
            if format.is_structured() {
                let mut v = output::token_json(&t);
                v["token"] = serde_json::Value::String(r.secret_token);
                return output::emit(format, out, &v);
            }
            writeln!(out, "{}", r.secret_token)?;
            writeln!(
                out,
                "join token {} for member {} pool {}: {} use(s), expires {} (shown once; the hub keeps only a hash)",
                t.id,
                t.member,
                t.pool,
                t.uses_left,
                output::time_text(t.expires_unix_ms)
            )?;
            Ok(())
        }
        TokenCommand::List => {
            let list = c.list_join_tokens(v1::ListJoinTokensRequest {}).await.map_err(status_line)?.into_inner();
            output::print_tokens(format, &list.tokens, chrono::Utc::now(), out)
        }
        TokenCommand::Revoke { id } => {
            let r = c.revoke_join_token(v1::RevokeJoinTokenRequest { id: id.clone() }).await.map_err(status_line)?;
            if !r.into_inner().existed {
                bail!("join token {id:?} not found; see `upkeepctl pki token list`");
            }
            writeln!(out, "join token {id} revoked")?;
            Ok(())
        }
    }
}

fn run_pki(cmd: &PkiCommand, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    let report = match cmd {
        PkiCommand::Revoke { .. } | PkiCommand::Revoked | PkiCommand::Status { .. } | PkiCommand::Token(_) => {
            bail!("pki revoke/revoked/status/token are not PKI-directory writes (internal error)")
        }
        PkiCommand::Fingerprint { dir } => {
            let path = dir.join(pki::files::CA_CERT);
            let pem = std::fs::read_to_string(&path).with_context(|| format!("--dir: {}", path.display()))?;
            let fp = pki::fingerprint_pem(&pem).map_err(|e| anyhow!("--dir: {}: {e}", path.display()))?;
            if format.is_structured() {
                return output::emit(format, out, &serde_json::json!({ "ca_fingerprint": fp }));
            }
            writeln!(out, "{fp}")?;
            return Ok(());
        }
        PkiCommand::Init { dir, hub_names } => pki::init(dir, hub_names).context("pki init")?,
        PkiCommand::IssueNode(a) => pki::issue_for(&a.dir, Role::Node, &a.name, a.days).context("pki issue-node")?,
        PkiCommand::IssueOperator(a) => {
            pki::issue_for(&a.dir, Role::Operator, &a.name, a.days).context("pki issue-operator")?
        }
        PkiCommand::IssueViewer(a) => {
            pki::issue_for(&a.dir, Role::Viewer, &a.name, a.days).context("pki issue-viewer")?
        }
    };
    match format {
        Format::Json | Format::Yaml => output::emit(format, out, &report)?,
        Format::Table => {
            for f in &report.files {
                writeln!(out, "wrote {}", f.display())?;
            }
            if let Some(fp) = &report.ca_fingerprint {
                writeln!(out, "CA fingerprint (SHA-256, for upkeep-agent join --ca-fingerprint): {fp}")?;
                writeln!(out, "move ca.key offline: the hub issues with issuer.pem and issuer.key")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_addresses_normalise() {
        assert_eq!(hub_url("127.0.0.1:7443").expect("ok"), ("https://127.0.0.1:7443".into(), "127.0.0.1".into()));
        assert_eq!(hub_url("https://hub.example:7443").expect("ok").1, "hub.example");
        assert_eq!(hub_url("https://[::1]:7443").expect("ok").1, "::1");
        let err = hub_url("http://hub:7443").expect_err("plaintext refused");
        assert!(err.to_string().contains("only https://"));
    }
}
