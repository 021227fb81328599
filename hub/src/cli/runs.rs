//! upkeepctl commands for images, strategies, member windows and update runs, and the run tree rendering.

use super::output::{NODE_IMAGE_LABEL, emit, table};
use super::{Format, status_line};
use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, TimeZone, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;
use upkeep_proto::v1;
use upkeep_proto::v1::operator_service_client::OperatorServiceClient;

type Client = OperatorServiceClient<Channel>;

/// `upkeepctl image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Upload an image artifact (if --file) and publish a version of a family in some regions. Publishing a
    /// version again adds the regions given (its other regions stay); its artifact never changes.
    Publish(PublishArgs),
    /// Withdraw a published version from one region (it stays published in its other regions).
    Withdraw {
        /// Image family, e.g. Debian-12-gen2.
        family: String,
        /// Version YYYYMM.DD.N.
        version: String,
        /// The region to take it back from.
        #[arg(long)]
        region: String,
    },
    /// List the catalog.
    List {
        /// Only this family.
        #[arg(long)]
        family: Option<String>,
    },
    /// Generate an image-signing key pair in DIR (upkeep-image.pub for nodes' trusted-keys, upkeep-image.key).
    Keygen {
        /// Directory for the two files.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign an image file with a secret key; writes FILE.minisig (minisign format).
    Sign {
        /// Secret key file.
        #[arg(long)]
        key: PathBuf,
        /// The image.
        file: PathBuf,
    },
    /// Build a small test image (a root tree tar with etc/upkeep/node-image) for simulated nodes.
    Build {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Image family.
        #[arg(long)]
        family: String,
        /// Version YYYYMM.DD.N.
        #[arg(long)]
        version: String,
    },
}

impl ImageCommand {
    /// Whether the command works offline (no hub connection).
    pub fn is_local(&self) -> bool {
        matches!(self, ImageCommand::Keygen { .. } | ImageCommand::Sign { .. } | ImageCommand::Build { .. })
    }
}

/// Runs the offline image commands.
pub fn image_local(cmd: &ImageCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    use crate::image_tools;
    match cmd {
        ImageCommand::Keygen { dir } => {
            let (public, secret) = image_tools::keygen(dir).context("image keygen")?;
            writeln!(out, "wrote {} (copy to each node's /etc/upkeep/trusted-keys/)", public.display())?;
            writeln!(out, "wrote {} (keep it secret)", secret.display())?;
        }
        ImageCommand::Sign { key, file } => {
            let sig = image_tools::sign(key, file).context("image sign")?;
            writeln!(out, "wrote {}", sig.display())?;
        }
        ImageCommand::Build { out: file, family, version } => {
            upkeep_core::version::validate_family(family).map_err(|e| anyhow!("--family: {e}"))?;
            version.parse::<upkeep_core::version::ImageVersion>().map_err(|e| anyhow!("--version: {e}"))?;
            let (sha, size) = image_tools::build_test_image(file, family, version, &[]).context("image build")?;
            writeln!(out, "wrote {} ({size} bytes, sha256 {sha})", file.display())?;
        }
        _ => bail!("not an offline image command"),
    }
    Ok(())
}

/// `upkeepctl kubernetes ...`
#[derive(Debug, Subcommand)]
pub enum KubernetesCommand {
    /// Make a Kubernetes release available in regions (Full and ControlPlaneOnly runs wait for it there).
    Publish {
        /// Version MAJOR.MINOR.PATCH.
        #[arg(long)]
        version: String,
        /// Regions, comma separated.
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// When it becomes available there (RFC 3339; default now).
        #[arg(long)]
        available_at: Option<String>,
    },
    /// List releases and their regions.
    List,
}

/// Runs a kubernetes command.
pub async fn kubernetes(
    c: &mut Client,
    cmd: &KubernetesCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        KubernetesCommand::Publish { version, regions, available_at } => {
            let at = available_at.as_deref().map(|s| parse_time("--available-at", s)).transpose()?.unwrap_or(0);
            let req = v1::PublishKubernetesRequest {
                version: version.clone(),
                regions: regions
                    .iter()
                    .map(|r| v1::RegionAvailability { region: r.clone(), available_at_unix_ms: at })
                    .collect(),
            };
            let r = c.publish_kubernetes(req).await.map_err(status_line)?.into_inner();
            writeln!(out, "Kubernetes {} available in {}", r.version, regions.join(","))?;
        }
        KubernetesCommand::List => {
            let all = c.list_kubernetes(v1::ListKubernetesRequest {}).await.map_err(status_line)?.into_inner().releases;
            if format.is_structured() {
                let v: Vec<serde_json::Value> = all
                    .iter()
                    .map(|k| serde_json::json!({"version": k.version, "regions": k.regions.iter().map(|r| (r.region.clone(), rfc3339_ms(r.available_at_unix_ms))).collect::<std::collections::BTreeMap<_, _>>()}))
                    .collect();
                return emit(format, out, &serde_json::json!({"releases": v}));
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|k| {
                    vec![
                        k.version.clone(),
                        k.regions
                            .iter()
                            .map(|r| format!("{}@{}", r.region, fmt_ms(r.available_at_unix_ms)))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            table(out, &["VERSION", "REGIONS (AVAILABLE FROM)"], &rows)?;
        }
    }
    Ok(())
}

/// `image publish` arguments.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Image family, e.g. Debian-12-gen2.
    #[arg(long)]
    pub family: String,
    /// Version YYYYMM.DD.N.
    #[arg(long)]
    pub version: String,
    /// Regions where it becomes available, comma separated; added to those of a version already published.
    #[arg(long, value_delimiter = ',')]
    pub regions: Vec<String>,
    /// When it becomes available (RFC 3339; default now). Applies to every region given.
    #[arg(long)]
    pub available_at: Option<String>,
    /// The artifact to upload to the hub.
    #[arg(long, conflicts_with = "url")]
    pub file: Option<PathBuf>,
    /// Or an https URL the nodes fetch it from (then --sha256 and --size are required).
    #[arg(long)]
    pub url: Option<String>,
    /// SHA-256 of the artifact (checked against the upload when --file is given).
    #[arg(long)]
    pub sha256: Option<String>,
    /// Size in bytes (with --url).
    #[arg(long)]
    pub size: Option<u64>,
    /// Detached minisign signature file (default: FILE.minisig).
    #[arg(long)]
    pub signature: Option<PathBuf>,
    /// `tar` (a root-tree archive; the hub checks it names this family and version) or `raw` (a disk image for
    /// raw slots, not looked into).
    #[arg(long, default_value = "tar")]
    pub format: String,
}

/// `upkeepctl strategy ...`
#[derive(Debug, Subcommand)]
pub enum StrategyCommand {
    /// Create or replace a strategy from a YAML or JSON file (`stages: [...]`).
    Create {
        /// Strategy name.
        name: String,
        /// JSON file with the stages.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Show a strategy.
    Show {
        /// Strategy name.
        name: String,
    },
    /// List strategies.
    List,
    /// Delete a strategy (runs made from it keep their copy).
    Delete {
        /// Strategy name.
        name: String,
    },
}

/// `upkeepctl run ...`
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Create an update run.
    Create(CreateArgs),
    /// Replace a run's order and target before it starts (same options as create).
    Update(CreateArgs),
    /// Start (or start again) a run.
    Start {
        /// Run name.
        name: String,
    },
    /// Stop a run: nothing new starts; running member upgrades finish.
    Stop {
        /// Run name.
        name: String,
    },
    /// Show the run tree: stages, groups, members with state, times, messages and errors.
    Show {
        /// Run name.
        name: String,
    },
    /// List runs.
    List,
    /// Delete a run that is not running.
    Delete {
        /// Run name.
        name: String,
    },
    /// Skip a member, a group (STAGE/GROUP), a stage, or the wait after a stage.
    Skip(SkipArgs),
    /// Stream the run's events until it ends; exits non-zero if it Failed.
    Watch {
        /// Run name.
        name: String,
    },
    /// Predicted order and start time of every member.
    Plan {
        /// Run name.
        name: String,
        /// Assumed duration of one member's upgrade, seconds.
        #[arg(long, default_value_t = 600)]
        member_seconds: u32,
    },
}

/// `run create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Run name.
    pub name: String,
    /// Copy this strategy's order.
    #[arg(long, conflicts_with = "file")]
    pub strategy: Option<String>,
    /// Or inline stages from a JSON file (`{"stages": [...]}`).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Full, ControlPlaneOnly or NodeImageOnly.
    #[arg(long)]
    pub upgrade_type: String,
    /// Target Kubernetes version (Full, ControlPlaneOnly).
    #[arg(long)]
    pub kubernetes_version: Option<String>,
    /// Latest, Consistent or Custom.
    #[arg(long, default_value = "Latest")]
    pub node_image_selection: String,
    /// FAMILY=VERSION pins for Custom (repeatable).
    #[arg(long = "custom-version")]
    pub custom_versions: Vec<String>,
}

/// `run skip` arguments.
#[derive(Debug, Args)]
pub struct SkipArgs {
    /// Run name.
    pub name: String,
    /// A member.
    #[arg(long)]
    pub member: Option<String>,
    /// A group, as STAGE/GROUP.
    #[arg(long)]
    pub group: Option<String>,
    /// A stage (and its wait).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only the wait after this stage.
    #[arg(long)]
    pub after_stage_wait: Option<String>,
}

fn read_file(flag: &str, path: &Path) -> anyhow::Result<String> {
    let limit = upkeep_core::limits::MAX_DOCUMENT_BYTES as u64;
    let size = std::fs::metadata(path).with_context(|| format!("{flag} {}: cannot read", path.display()))?.len();
    if size > limit {
        bail!(
            "{flag} {}: {size} bytes is more than {limit} (1 MiB); a strategy, run, window or signature file is a \
             few kilobytes, check that this is the right file",
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

/// Reads a YAML or JSON file (JSON is YAML) and returns it as JSON for the hub.
fn read_spec(flag: &str, path: &Path) -> anyhow::Result<String> {
    let text = read_file(flag, path)?;
    // Size and depth before parsing: a hostile file is refused after one scan, not after a minute in the parser.
    upkeep_core::limits::check_document(&text).map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
    let value: serde_json::Value =
        super::yaml::parse(&text).map_err(|e| anyhow!("{flag} {}: not valid YAML or JSON: {e}", path.display()))?;
    Ok(serde_json::to_string(&value)?)
}

fn parse_time(flag: &str, s: &str) -> anyhow::Result<i64> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| anyhow!("{flag} {s:?}: {e}; expected RFC 3339, e.g. 2026-11-23T06:00:00Z"))
}

fn fmt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into())
}

fn fmt_ms(ms: i64) -> String {
    fmt_time(Utc.timestamp_millis_opt(ms).single())
}

/// Runs an image command.
pub async fn image(c: &mut Client, cmd: &ImageCommand, format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Publish(a) => {
            let signature_path = match (&a.signature, &a.file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => PathBuf::from(format!("{}.minisig", f.display())),
                (None, None) => bail!("--signature is required with --url"),
            };
            let signature = read_file("--signature", &signature_path)?;
            let (sha256, size, url) = match (&a.file, &a.url) {
                (Some(f), _) => {
                    let r = upload(c, f, a.sha256.as_deref()).await?;
                    (r.sha256, r.size_bytes, String::new())
                }
                (None, Some(u)) => (
                    a.sha256.clone().ok_or_else(|| anyhow!("--sha256 is required with --url"))?,
                    a.size.ok_or_else(|| anyhow!("--size is required with --url"))?,
                    u.clone(),
                ),
                (None, None) => bail!("give --file (upload to the hub) or --url"),
            };
            let at = a.available_at.as_deref().map(|s| parse_time("--available-at", s)).transpose()?.unwrap_or(0);
            let req = v1::PublishImageRequest {
                family: a.family.clone(),
                version: a.version.clone(),
                regions: a
                    .regions
                    .iter()
                    .map(|r| v1::RegionAvailability { region: r.clone(), available_at_unix_ms: at })
                    .collect(),
                sha256,
                signature,
                url,
                size_bytes: size,
                format: a.format.clone(),
            };
            let img = c.publish_image(req).await.map_err(status_line)?.into_inner();
            if format.is_structured() {
                return emit(format, out, &image_json(&img));
            }
            writeln!(
                out,
                "published {}-{} ({} bytes, sha256 {}) in {}; now available in {}",
                img.family,
                img.version,
                img.size_bytes,
                img.sha256,
                a.regions.join(","),
                region_list(&img)
            )?;
            Ok(())
        }
        ImageCommand::Withdraw { family, version, region } => {
            let req =
                v1::WithdrawImageRequest { family: family.clone(), version: version.clone(), region: region.clone() };
            let img = c.withdraw_image(req).await.map_err(status_line)?.into_inner();
            if format.is_structured() {
                return emit(format, out, &image_json(&img));
            }
            writeln!(
                out,
                "withdrew {}-{} from {region}; still available in {}",
                img.family,
                img.version,
                region_list(&img)
            )?;
            Ok(())
        }
        ImageCommand::Keygen { .. } | ImageCommand::Sign { .. } | ImageCommand::Build { .. } => image_local(cmd, out),
        ImageCommand::List { family } => {
            let list = c
                .list_images(v1::ListImagesRequest { family: family.clone().unwrap_or_default() })
                .await
                .map_err(status_line)?
                .into_inner()
                .images;
            if format.is_structured() {
                #[derive(Serialize)]
                struct List {
                    images: Vec<ImageJson>,
                }
                return emit(format, out, &List { images: list.iter().map(image_json).collect() });
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|i| {
                    vec![
                        i.family.clone(),
                        i.version.clone(),
                        i.regions
                            .iter()
                            .map(|r| format!("{}@{}", r.region, fmt_ms(r.available_at_unix_ms)))
                            .collect::<Vec<_>>()
                            .join(","),
                        i.size_bytes.to_string(),
                        i.sha256.chars().take(12).collect(),
                    ]
                })
                .collect();
            table(out, &["FAMILY", "VERSION", "REGIONS (AVAILABLE FROM)", "BYTES", "SHA256"], &rows)?;
            Ok(())
        }
    }
}

/// JSON form of a catalog image (`image list`, `image publish`, `image withdraw`; docs/cli-json.md).
#[derive(Debug, Serialize)]
struct ImageJson {
    family: String,
    version: String,
    /// region -> available from (RFC 3339).
    regions: std::collections::BTreeMap<String, String>,
    sha256: String,
    size_bytes: u64,
    url: String,
    published_at: String,
}

fn image_json(i: &v1::Image) -> ImageJson {
    ImageJson {
        family: i.family.clone(),
        version: i.version.clone(),
        regions: i.regions.iter().map(|r| (r.region.clone(), rfc3339_ms(r.available_at_unix_ms))).collect(),
        sha256: i.sha256.clone(),
        size_bytes: i.size_bytes,
        url: i.url.clone(),
        published_at: rfc3339_ms(i.published_at_unix_ms),
    }
}

/// The regions of an image, comma separated.
fn region_list(i: &v1::Image) -> String {
    i.regions.iter().map(|r| r.region.as_str()).collect::<Vec<_>>().join(",")
}

fn rfc3339_ms(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Uploads a file in chunks; the hub checks the digest if one is declared.
pub async fn upload(c: &mut Client, path: &Path, declared: Option<&str>) -> anyhow::Result<v1::UploadArtifactResponse> {
    let bytes = std::fs::read(path).with_context(|| format!("--file {}: cannot read", path.display()))?;
    let declared = declared.unwrap_or_default().to_string();
    let chunks: Vec<v1::ArtifactChunk> = bytes
        .chunks(256 * 1024)
        .enumerate()
        .map(|(i, d)| v1::ArtifactChunk {
            data: d.to_vec(),
            declared_sha256: if i == 0 { declared.clone() } else { String::new() },
        })
        .collect();
    let chunks = if chunks.is_empty() {
        vec![v1::ArtifactChunk { data: Vec::new(), declared_sha256: declared }]
    } else {
        chunks
    };
    Ok(c.upload_artifact(tokio_stream::iter(chunks)).await.map_err(status_line)?.into_inner())
}

/// Runs a strategy command.
pub async fn strategy(
    c: &mut Client,
    cmd: &StrategyCommand,
    format: Format,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        StrategyCommand::Create { name, file } => {
            let spec_json = read_spec("-f", file)?;
            let s =
                c.put_strategy(v1::PutStrategyRequest { name: name.clone(), spec_json }).await.map_err(status_line)?;
            writeln!(out, "strategy {} stored", s.into_inner().name)?;
        }
        StrategyCommand::Show { name } => {
            let s =
                c.get_strategy(v1::GetStrategyRequest { name: name.clone() }).await.map_err(status_line)?.into_inner();
            let v: serde_json::Value = serde_json::from_str(&s.spec_json)?;
            if format.is_structured() {
                return emit(format, out, &serde_json::json!({"name": s.name, "spec": v}));
            }
            writeln!(out, "strategy {}", s.name)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        StrategyCommand::List => {
            let all =
                c.list_strategies(v1::ListStrategiesRequest {}).await.map_err(status_line)?.into_inner().strategies;
            if format.is_structured() {
                let v: Vec<serde_json::Value> = all
                    .iter()
                    .map(|s| serde_json::json!({"name": s.name, "spec": serde_json::from_str::<serde_json::Value>(&s.spec_json).unwrap_or_default()}))
                    .collect();
                return emit(format, out, &serde_json::json!({"strategies": v}));
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|s| {
                    let stages = serde_json::from_str::<upkeep_core::run::StrategySpec>(&s.spec_json)
                        .map(|sp| sp.stages.iter().map(|st| st.name.clone()).collect::<Vec<_>>().join(" -> "))
                        .unwrap_or_default();
                    vec![s.name.clone(), stages]
                })
                .collect();
            table(out, &["NAME", "STAGES"], &rows)?;
        }
        StrategyCommand::Delete { name } => {
            let r = c.delete_strategy(v1::GetStrategyRequest { name: name.clone() }).await.map_err(status_line)?;
            if !r.into_inner().existed {
                bail!("strategy {name:?} not found; see `upkeepctl strategy list`");
            }
            writeln!(out, "strategy {name} deleted")?;
        }
    }
    Ok(())
}

/// A run's own level (every hub answer carries it; an empty one reads as NotStarted).
pub fn run_level(run: &v1::Run) -> v1::RunLevel {
    run.level.clone().unwrap_or_else(|| v1::RunLevel { status: "NotStarted".into(), ..Default::default() })
}

fn member_count(run: &v1::Run) -> usize {
    run.stages.iter().flat_map(|s| &s.groups).map(|g| g.members.len()).sum()
}

/// Runs a run command. Returns the exit status to use (watch: non-zero if the run Failed).
pub async fn run(c: &mut Client, cmd: &RunCommand, format: Format, out: &mut dyn Write) -> anyhow::Result<bool> {
    let name_req = |n: &str| v1::RunNameRequest { name: n.to_string() };
    match cmd {
        RunCommand::Create(a) | RunCommand::Update(a) => {
            let stages_json = a.file.as_deref().map(|f| read_spec("-f", f)).transpose()?.unwrap_or_default();
            let req = v1::CreateRunRequest {
                name: a.name.clone(),
                strategy_name: a.strategy.clone().unwrap_or_default(),
                stages_json,
                upgrade_type: a.upgrade_type.clone(),
                kubernetes_version: a.kubernetes_version.clone().unwrap_or_default(),
                node_image_selection: a.node_image_selection.clone(),
                custom_versions: a.custom_versions.clone(),
            };
            let (r, verb) = if matches!(cmd, RunCommand::Update(_)) {
                (c.update_run(req).await.map_err(status_line)?.into_inner(), "updated")
            } else {
                (c.create_run(req).await.map_err(status_line)?.into_inner(), "created")
            };
            writeln!(out, "run {} {verb} ({} members)", r.name, member_count(&r))?;
        }
        RunCommand::Start { name } => {
            let r = c.start_run(name_req(name)).await.map_err(status_line)?.into_inner();
            writeln!(out, "run {} is {}", r.name, run_level(&r).status)?;
        }
        RunCommand::Stop { name } => {
            let r = c.stop_run(name_req(name)).await.map_err(status_line)?.into_inner();
            writeln!(out, "run {} is {}", r.name, run_level(&r).status)?;
        }
        RunCommand::Delete { name } => {
            let r = c.delete_run(name_req(name)).await.map_err(status_line)?.into_inner();
            if !r.existed {
                bail!("run {name:?} not found; see `upkeepctl run list`");
            }
            writeln!(out, "run {name} deleted")?;
        }
        RunCommand::Skip(a) => {
            let req = v1::SkipRunRequest {
                name: a.name.clone(),
                member: a.member.clone().unwrap_or_default(),
                group: a.group.clone().unwrap_or_default(),
                stage: a.stage.clone().unwrap_or_default(),
                after_stage_wait: a.after_stage_wait.clone().unwrap_or_default(),
            };
            let r = c.skip_run(req).await.map_err(status_line)?.into_inner();
            writeln!(out, "run {} is {}", r.name, run_level(&r).status)?;
        }
        RunCommand::Show { name } => {
            let r = c.get_run(name_req(name)).await.map_err(status_line)?.into_inner();
            if format.is_structured() {
                return emit(format, out, &run_json(&r)).map(|_| true);
            }
            print_tree(&r, out)?;
        }
        RunCommand::List => {
            let all = c.list_runs(v1::ListRunsRequest {}).await.map_err(status_line)?.into_inner().runs;
            if format.is_structured() {
                let v: Vec<serde_json::Value> = all.iter().map(run_json).collect();
                return emit(format, out, &serde_json::json!({"runs": v})).map(|_| true);
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|r| {
                    let l = run_level(r);
                    vec![
                        r.name.clone(),
                        l.status.clone(),
                        r.upgrade_type.clone(),
                        r.stages.len().to_string(),
                        member_count(r).to_string(),
                        fmt_level_ms(l.started_unix_ms),
                        fmt_level_ms(l.ended_unix_ms),
                    ]
                })
                .collect();
            table(out, &["NAME", "STATUS", "UPGRADE", "STAGES", "MEMBERS", "STARTED", "ENDED"], &rows)?;
        }
        RunCommand::Plan { name, member_seconds } => {
            let p = c
                .plan_run(v1::PlanRunRequest { name: name.clone(), assumed_member_seconds: *member_seconds })
                .await
                .map_err(status_line)?
                .into_inner();
            if format.is_structured() {
                let v: Vec<serde_json::Value> = p
                    .members
                    .iter()
                    .map(|m| serde_json::json!({"member": m.member, "stage": m.stage, "group": m.group, "predicted_start": rfc3339_ms(m.at_unix_ms)}))
                    .collect();
                return emit(format, out, &serde_json::json!({"members": v})).map(|_| true);
            }
            let rows: Vec<Vec<String>> = p
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    vec![(i + 1).to_string(), m.member.clone(), m.stage.clone(), m.group.clone(), fmt_ms(m.at_unix_ms)]
                })
                .collect();
            table(out, &["#", "MEMBER", "STAGE", "GROUP", "PREDICTED START (UTC)"], &rows)?;
        }
        RunCommand::Watch { name } => return watch(c, name, format, out).await,
    }
    Ok(true)
}

async fn watch(c: &mut Client, name: &str, format: Format, out: &mut dyn Write) -> anyhow::Result<bool> {
    use std::io::IsTerminal;
    if format == Format::Table && std::io::stdout().is_terminal() {
        return watch_live(c, name, out).await;
    }
    let mut stream = c
        .watch_run(v1::WatchRunRequest { name: name.to_string(), from_seq: 0 })
        .await
        .map_err(status_line)?
        .into_inner();
    let mut last_status = String::new();
    while let Some(e) = stream.message().await.map_err(status_line)? {
        last_status = e.run_status.clone();
        if format.is_structured() {
            let v = serde_json::json!({
                "seq": e.seq, "at": rfc3339_ms(e.at_unix_ms), "kind": e.kind, "level": e.level,
                "from": e.from, "to": e.to, "message": e.message, "error": e.error, "run_status": e.run_status,
            });
            if format == Format::Yaml {
                write!(out, "---\n{}", super::yaml::to_string(&v)?)?;
            } else {
                writeln!(out, "{v}")?;
            }
        } else {
            let err = if e.error.is_empty() { String::new() } else { format!(" error: {}", e.error) };
            writeln!(
                out,
                "{} {:<40} {:>10} -> {:<10} {}{err}",
                fmt_ms(e.at_unix_ms),
                e.level,
                e.from,
                e.to,
                e.message
            )?;
        }
        out.flush()?;
    }
    let r = c.get_run(v1::RunNameRequest { name: name.to_string() }).await.map_err(status_line)?.into_inner();
    let status = run_level(&r).status;
    if format == Format::Table {
        writeln!(out, "run {name} is {status}")?;
    }
    let _ = last_status;
    Ok(status != "Failed")
}

/// `run watch` on a terminal: a live tree of progress bars, one per member (nodes done of nodes), under a run
/// line; the final tree is printed when the run ends. Off a terminal, `watch` prints one line per event instead.
async fn watch_live(c: &mut Client, name: &str, out: &mut dyn Write) -> anyhow::Result<bool> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let run = c.get_run(v1::RunNameRequest { name: name.to_string() }).await.map_err(status_line)?.into_inner();
    let nodes = c.list_nodes(v1::ListNodesRequest::default()).await.map_err(status_line)?.into_inner().nodes;
    let count = |m: &str| nodes.iter().filter(|n| n.report.as_ref().is_some_and(|r| r.member == m)).count() as u64;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<36} [{bar:20}] {pos:>3}/{len:<3} {msg}")
        .map_err(|e| anyhow!("progress style: {e}"))?
        .progress_chars("=> ");
    let top = multi.add(ProgressBar::new_spinner());
    top.set_message(format!("run {name}: {}", run_level(&run).status));
    let mut bars = std::collections::HashMap::new();
    for st in &run.stages {
        for g in &st.groups {
            for m in &g.members {
                let total = m.nodes.as_ref().map(|p| u64::from(p.total)).unwrap_or_else(|| count(&m.name));
                let bar = multi.add(ProgressBar::new(total.max(1)));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{}/{}/{}", st.name, g.name, m.name));
                if let Some(p) = &m.nodes {
                    bar.set_position(u64::from(p.done + p.skipped + p.failed));
                }
                bar.set_message(m.level.as_ref().map(|l| l.status.clone()).unwrap_or_default());
                bars.insert(m.name.clone(), bar);
            }
        }
    }
    let mut stream = c
        .watch_run(v1::WatchRunRequest { name: name.to_string(), from_seq: 0 })
        .await
        .map_err(status_line)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(status_line)? {
        top.set_message(format!("run {name}: {}", e.run_status));
        top.tick();
        let Some(bar) = bars.get(&e.member) else { continue };
        match e.kind.as_str() {
            "member" => {
                let err = if e.error.is_empty() { String::new() } else { format!(" error: {}", e.error) };
                bar.set_message(format!("{}: {}{err}", e.to, e.message));
                if matches!(e.to.as_str(), "Completed" | "Skipped") {
                    bar.set_position(bar.length().unwrap_or(1));
                }
            }
            "node" if e.to == "Completed" => bar.inc(1),
            _ => {}
        }
    }
    top.finish();
    let _ = multi.clear();
    let r = c.get_run(v1::RunNameRequest { name: name.to_string() }).await.map_err(status_line)?.into_inner();
    print_tree(&r, out)?;
    Ok(run_level(&r).status != "Failed")
}

fn ms_time(ms: i64) -> Option<DateTime<Utc>> {
    if ms == 0 { None } else { Utc.timestamp_millis_opt(ms).single() }
}

fn fmt_level_ms(ms: i64) -> String {
    fmt_time(ms_time(ms))
}

fn json_time(ms: i64) -> serde_json::Value {
    ms_time(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).into()
}

/// The five fields every level carries in `-o json` (docs/cli-json.md).
pub fn level_json(l: Option<&v1::RunLevel>) -> serde_json::Value {
    let d = v1::RunLevel { status: "NotStarted".into(), ..Default::default() };
    let l = l.unwrap_or(&d);
    serde_json::json!({
        "status": l.status,
        "started_at": json_time(l.started_unix_ms),
        "ended_at": json_time(l.ended_unix_ms),
        "message": l.message,
        "error": l.error,
    })
}

fn empty_null(s: &str) -> serde_json::Value {
    if s.is_empty() { serde_json::Value::Null } else { s.into() }
}

/// The JSON tree of a run (docs/cli-json.md), from the hub's typed run.
pub fn run_json(r: &v1::Run) -> serde_json::Value {
    let mut v = level_json(r.level.as_ref());
    v["name"] = r.name.clone().into();
    v["strategy"] = empty_null(&r.strategy_name);
    v["upgrade_type"] = r.upgrade_type.clone().into();
    v["kubernetes_version"] = empty_null(&r.kubernetes_version);
    v["node_image_selection"] = match &r.node_image_selection {
        Some(s) if s.mode == "Custom" => serde_json::json!({
            "mode": s.mode,
            "pins": s.pins.iter().map(|p| serde_json::json!({"family": p.family, "version": p.version})).collect::<Vec<_>>(),
        }),
        Some(s) => serde_json::json!({"mode": s.mode}),
        None => serde_json::json!({"mode": "Latest"}),
    };
    v["selected_images"] = if r.selected_images.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::to_value(r.selected_images.iter().collect::<std::collections::BTreeMap<_, _>>()).unwrap_or_default()
    };
    v["stages"] = r
        .stages
        .iter()
        .map(|st| {
            let mut sv = level_json(st.level.as_ref());
            sv["name"] = st.name.clone().into();
            sv["after_stage_wait_seconds"] = st.after_stage_wait_seconds.into();
            sv["after_stage_wait"] =
                st.after_stage_wait.as_ref().map(|w| level_json(Some(w))).unwrap_or(serde_json::Value::Null);
            sv["groups"] = st
                .groups
                .iter()
                .map(|g| {
                    let mut gv = level_json(g.level.as_ref());
                    gv["name"] = g.name.clone().into();
                    gv["members"] = g
                        .members
                        .iter()
                        .map(|m| {
                            let mut mv = level_json(m.level.as_ref());
                            mv["name"] = m.name.clone().into();
                            mv["attempts"] = m.attempts.into();
                            mv["target"] = m
                                .target
                                .as_ref()
                                .map(|t| {
                                    serde_json::json!({
                                        "kubernetes_version": empty_null(&t.kubernetes_version),
                                        "images": t.images.iter().collect::<std::collections::BTreeMap<_, _>>(),
                                    })
                                })
                                .unwrap_or(serde_json::Value::Null);
                            mv
                        })
                        .collect::<Vec<_>>()
                        .into();
                    gv
                })
                .collect::<Vec<_>>()
                .into();
            sv
        })
        .collect::<Vec<_>>()
        .into();
    v
}

fn line(out: &mut dyn Write, indent: usize, what: &str, l: Option<&v1::RunLevel>) -> std::io::Result<()> {
    let d = v1::RunLevel { status: "NotStarted".into(), ..Default::default() };
    let l = l.unwrap_or(&d);
    let pad = "  ".repeat(indent);
    let times = match (ms_time(l.started_unix_ms), ms_time(l.ended_unix_ms)) {
        (Some(s), Some(e)) => format!("{} .. {}", fmt_time(Some(s)), fmt_time(Some(e))),
        (Some(s), None) => format!("since {}", fmt_time(Some(s))),
        _ => String::new(),
    };
    let msg = if l.message.is_empty() { String::new() } else { format!("  {}", l.message) };
    let text = format!("{pad}{what:<w$} {:<11}{times}{msg}", l.status, w = 34usize.saturating_sub(pad.len()));
    writeln!(out, "{}", text.trim_end())?;
    if let Some(e) = &l.error {
        writeln!(out, "{pad}  error: {e}")?;
    }
    Ok(())
}

/// The run tree for people.
pub fn print_tree(r: &v1::Run, out: &mut dyn Write) -> anyhow::Result<()> {
    let target = if r.kubernetes_version.is_empty() {
        r.upgrade_type.clone()
    } else {
        format!("{} to Kubernetes {}", r.upgrade_type, r.kubernetes_version)
    };
    let sel = r.node_image_selection.clone().unwrap_or_default();
    let mode = if sel.mode == "Custom" {
        let pins: Vec<String> = sel.pins.iter().map(|p| format!("{}={}", p.family, p.version)).collect();
        format!("Custom {}", pins.join(","))
    } else if sel.mode.is_empty() {
        "Latest".into()
    } else {
        sel.mode.clone()
    };
    writeln!(out, "Run {} ({target}, node images {mode})", r.name)?;
    for (f, v) in &r.selected_images.iter().collect::<std::collections::BTreeMap<_, _>>() {
        writeln!(out, "  selected image: {NODE_IMAGE_LABEL}={f}-{v}")?;
    }
    line(out, 0, "run", r.level.as_ref())?;
    for st in &r.stages {
        line(out, 1, &format!("stage {}", st.name), st.level.as_ref())?;
        for g in &st.groups {
            line(out, 2, &format!("group {}", g.name), g.level.as_ref())?;
            for m in &g.members {
                let what = match &m.nodes {
                    Some(p) if p.total > 0 => format!("member {} {}/{}", m.name, p.done + p.skipped, p.total),
                    _ => format!("member {}", m.name),
                };
                line(out, 3, &what, m.level.as_ref())?;
            }
        }
        if st.after_stage_wait_seconds > 0 {
            line(out, 2, &format!("wait {}s", st.after_stage_wait_seconds), st.after_stage_wait.as_ref())?;
        }
    }
    Ok(())
}

pub async fn member_settings(
    c: &mut Client,
    member: &str,
    kind: Option<&str>,
    schedule: Option<&Path>,
    clear: bool,
    max_unavailable: Option<&str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let settings = if let Some(mu) = max_unavailable {
        c.set_member_disruption(v1::SetMemberDisruptionRequest {
            member: member.into(),
            max_unavailable: mu.into(),
            ..Default::default()
        })
        .await
        .map_err(status_line)?
        .into_inner()
    } else {
        let schedule_json = match (schedule, clear) {
            (Some(p), false) => read_spec("-f", p)?,
            (None, true) => String::new(),
            _ => bail!("give -f SCHEDULE.json or --clear"),
        };
        c.set_member_window(v1::SetMemberWindowRequest {
            member: member.into(),
            kind: kind.unwrap_or("node-os").into(),
            schedule_json,
        })
        .await
        .map_err(status_line)?
        .into_inner()
    };
    for w in &settings.warnings {
        writeln!(out, "warning: {w}")?;
    }
    print_settings(&settings, out)
}

fn print_settings(settings: &v1::MemberSettings, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "member {}: node OS window {}, cluster window {}, max_unavailable {}, drain timeout {} s, undrainable {} \
         (at most {} node(s) per piece of work)",
        settings.member,
        if settings.node_os_schedule_json.is_empty() { "none" } else { "set" },
        if settings.cluster_schedule_json.is_empty() { "none" } else { "set" },
        settings.max_unavailable,
        settings.drain_timeout_seconds,
        settings.undrainable,
        settings.max_undrainable
    )?;
    Ok(())
}

/// `member set-drain`: drain timeout and undrainable policy.
pub async fn member_drain(
    c: &mut Client,
    member: &str,
    timeout_seconds: Option<u32>,
    undrainable: Option<&str>,
    max_undrainable: Option<u32>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if timeout_seconds.is_none() && undrainable.is_none() && max_undrainable.is_none() {
        bail!("give --timeout SECONDS, --undrainable Fail|SkipNode|Force or --max-undrainable N");
    }
    let settings = c
        .set_member_disruption(v1::SetMemberDisruptionRequest {
            member: member.into(),
            max_unavailable: String::new(),
            drain_timeout_seconds: timeout_seconds,
            undrainable: undrainable.unwrap_or_default().into(),
            max_undrainable,
        })
        .await
        .map_err(status_line)?
        .into_inner();
    print_settings(&settings, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use upkeep_core::run::{
        GroupSpec, NodeImageSelection, RunState, StageSpec, StrategySpec, UpdateRunSpec, UpgradeType,
    };

    fn wire(state: &RunState, strategy: &str) -> v1::Run {
        let rec = crate::store::RunRecord {
            name: state.spec.name.clone(),
            parts: Vec::new(),
            version: 1,
            status: String::new(),
            strategy_name: Some(strategy.into()),
            created_ms: 0,
        };
        crate::grpc::runview::run_tree(&rec, state, None)
    }

    fn run() -> (v1::Run, RunState) {
        let spec = UpdateRunSpec {
            name: "r1".into(),
            strategy: Some(StrategySpec {
                stages: vec![
                    StageSpec {
                        name: "canary".into(),
                        groups: vec![GroupSpec { name: "g".into(), members: vec!["m1".into()], max_concurrency: None }],
                        after_stage_wait_seconds: Some(60),
                        max_concurrency: None,
                    },
                    StageSpec {
                        name: "prod".into(),
                        groups: vec![GroupSpec {
                            name: "east".into(),
                            members: vec!["m2".into(), "m3".into()],
                            max_concurrency: None,
                        }],
                        after_stage_wait_seconds: None,
                        max_concurrency: None,
                    },
                ],
            }),
            upgrade_type: UpgradeType::NodeImageOnly,
            kubernetes_version: None,
            node_image_selection: NodeImageSelection::Latest,
        };
        let state = RunState::new(&spec, &["m1".into(), "m2".into(), "m3".into()]).expect("valid");
        (wire(&state, "rollout"), state)
    }

    #[test]
    fn run_tree_golden() {
        let (r, _) = run();
        let mut out = Vec::new();
        print_tree(&r, &mut out).expect("render");
        let expected = "\
Run r1 (NodeImageOnly, node images Latest)
run                                NotStarted
  stage canary                     NotStarted
    group g                        NotStarted
      member m1                    NotStarted
    wait 60s                       NotStarted
  stage prod                       NotStarted
    group east                     NotStarted
      member m2                    NotStarted
      member m3                    NotStarted
";
        assert_eq!(String::from_utf8(out).expect("utf8"), expected);
    }

    #[test]
    fn run_json_has_stable_names() {
        let (r, _) = run();
        let v = run_json(&r);
        assert_eq!(v["name"], "r1");
        assert_eq!(v["strategy"], "rollout");
        assert_eq!(v["status"], "NotStarted");
        assert_eq!(v["upgrade_type"], "NodeImageOnly");
        assert_eq!(v["stages"][0]["after_stage_wait_seconds"], 60);
        assert_eq!(v["stages"][0]["after_stage_wait"]["status"], "NotStarted");
        assert_eq!(v["stages"][1]["groups"][0]["members"][1]["name"], "m3");
        assert!(v["stages"][1]["groups"][0]["members"][1]["started_at"].is_null());
    }

    /// The typed tree carries everything the JSON shows: times, errors, targets, pins, the chosen images.
    #[test]
    fn run_json_from_the_typed_tree_keeps_every_field() {
        let (_, mut s) = run();
        std::sync::Arc::make_mut(&mut s.spec).node_image_selection = NodeImageSelection::Custom {
            pins: vec![upkeep_core::run::ImagePin { family: "F".into(), version: "202401.02.3".parse().expect("v") }],
        };
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-23T18:00:00Z").expect("t").with_timezone(&Utc);
        s.run.status = upkeep_core::run::Status::Failed;
        s.run.started_at = Some(t0);
        s.run.ended_at = Some(t0 + chrono::TimeDelta::seconds(90));
        s.run.error = Some("member m1 failed".into());
        let m = std::sync::Arc::make_mut(&mut s.stages[0].groups[0].members[0]);
        m.attempts = 2;
        m.level.message = "drain n1".into();
        m.target = Some(upkeep_core::run::MemberTarget {
            kubernetes_version: None,
            images: [("pool1".to_string(), "F-202401.02.3".parse().expect("niv"))].into(),
        });
        s.image_selection = Some([("F".to_string(), "202401.02.3".parse().expect("v"))].into());
        let v = run_json(&wire(&s, ""));
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["started_at"], "2026-11-23T18:00:00Z");
        assert_eq!(v["ended_at"], "2026-11-23T18:01:30Z");
        assert_eq!(v["error"], "member m1 failed");
        assert!(v["strategy"].is_null() && v["kubernetes_version"].is_null(), "{v}");
        assert_eq!(
            v["node_image_selection"],
            serde_json::json!({"mode": "Custom", "pins": [{"family": "F", "version": "202401.02.3"}]})
        );
        assert_eq!(v["selected_images"], serde_json::json!({"F": "202401.02.3"}));
        let m1 = &v["stages"][0]["groups"][0]["members"][0];
        assert_eq!(m1["attempts"], 2);
        assert_eq!(m1["message"], "drain n1");
        assert!(m1["error"].is_null());
        assert_eq!(m1["target"], serde_json::json!({"kubernetes_version": null, "images": {"pool1": "F-202401.02.3"}}));
        assert!(v["stages"][1]["after_stage_wait"].is_null());
        assert_eq!(v["stages"][1]["after_stage_wait_seconds"], 0);
    }
}
