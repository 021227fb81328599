//! `upkeepctl dashboard`: a read-only web UI served on the operator's machine.
//!
//! It is a small HTTP server (hyper) in upkeepctl that asks the hub through the same mTLS client as every other
//! command, with the operator's or viewer's certificate; the hub grows no browser-facing port. Pages are rendered
//! on the server and complete without JavaScript; one small script (embedded, no build step) makes a run page
//! follow the run live over Server-Sent Events fed by the hub's `WatchRun` stream. Every value put into HTML is
//! escaped ([`esc`]); the pages forbid inline scripts and foreign origins (Content-Security-Policy).

use super::{Cli, connect, status_line};
use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, TimeZone, Utc};
use clap::Args;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use upkeep_proto::v1;
use upkeep_proto::v1::operator_service_client::OperatorServiceClient;

type Client = OperatorServiceClient<Channel>;
type Body = BoxBody<Bytes, Infallible>;

const STYLE: &str = include_str!("dashboard/style.css");
const SCRIPT: &str = include_str!("dashboard/live.js");
/// Pages may load only the dashboard's own script and style and talk only to the dashboard.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// Events arriving within this time of each other are shown as one update (a replay collapses into a few).
const COALESCE: Duration = Duration::from_millis(100);
/// A comment line on a quiet event stream, so a closed browser tab is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Connections served at once (a browser opens a few per page; the rest wait).
const MAX_CONNECTIONS: usize = 64;

/// `upkeepctl dashboard` arguments.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Address to serve the pages on. Port 0 picks a free port (the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Serve on an address other than loopback: whoever reaches it sees the fleet as your certificate does.
    #[arg(long)]
    pub allow_remote: bool,
}

/// Checks `--listen`: an IP:PORT, on loopback unless `allow_remote`.
pub fn listen_addr(args: &DashboardArgs) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = args.listen.parse().map_err(|_| {
        anyhow!("--listen {:?}: not an IP:PORT address; give e.g. --listen 127.0.0.1:8080", args.listen)
    })?;
    if !addr.ip().is_loopback() && !args.allow_remote {
        bail!(
            "--listen {addr}: not a loopback address; the dashboard shows the fleet to whoever reaches it. \
             Use 127.0.0.1, or add --allow-remote to serve on {} anyway",
            addr.ip()
        );
    }
    Ok(addr)
}

struct Dash {
    client: Client,
    /// Whom the hub sees (shown in the page header).
    who: String,
    /// Host header values accepted (loopback listeners only: a page of another site that points a name at
    /// 127.0.0.1 cannot read the dashboard).
    hosts: Option<Vec<String>>,
}

/// Serves the dashboard until Ctrl-C.
pub async fn serve(cli: &Cli, args: &DashboardArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let addr = listen_addr(args)?;
    let mut client = connect(cli).await?;
    let me = client.who_am_i(v1::WhoAmIRequest {}).await.map_err(status_line)?.into_inner();
    let listener = TcpListener::bind(addr).await.with_context(|| format!("--listen {addr}: cannot listen"))?;
    let local = listener.local_addr().with_context(|| format!("--listen {addr}"))?;
    let hosts = local.ip().is_loopback().then(|| {
        let port = local.port();
        vec![format!("{local}"), format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]
    });
    let dash = Arc::new(Dash { client, who: format!("{} {}", me.role, me.name), hosts });
    writeln!(out, "dashboard at http://{local}/ (read-only, as {} {}); Ctrl-C stops it", me.role, me.name)?;
    out.flush()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let (tcp, _) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else { return Ok(()) };
        let dash = dash.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let dash = dash.clone();
                async move { Ok::<_, Infallible>(handle(&dash, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            drop(permit);
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

const HTML: &str = "text/html; charset=utf-8";

async fn handle(dash: &Dash, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return full(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "read-only: GET only\n");
    }
    if let Some(hosts) = &dash.hosts {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !hosts.iter().any(|h| h == host) {
            return full(StatusCode::MISDIRECTED_REQUEST, "text/plain; charset=utf-8", "unexpected Host header\n");
        }
    }
    let path = req.uri().path().to_string();
    let parts: Vec<String> = path.trim_matches('/').split('/').map(decode).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut c = dash.client.clone();
    let page = match parts.as_slice() {
        ["style.css"] => return full(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        ["live.js"] => return full(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
        ["runs", name, "events"] => return run_events(c, name.to_string()),
        [""] | ["fleet"] => fleet_page(&mut c).await,
        ["members"] => members_page(&mut c).await,
        ["runs"] => runs_page(&mut c).await,
        ["runs", name] => run_page(&mut c, name).await,
        ["nodes", name] => node_page(&mut c, name).await,
        ["compliance"] => compliance_page(&mut c).await,
        ["schedule"] => schedule_page(&mut c).await,
        _ => Err(PageError(StatusCode::NOT_FOUND, format!("no page at {path}"))),
    };
    match page {
        Ok((title, body)) => full(StatusCode::OK, HTML, layout(&title, &dash.who, &body)),
        Err(PageError(status, msg)) => {
            let body = format!("<p class=\"error\">{}</p>", esc(&msg));
            full(status, HTML, layout(status.canonical_reason().unwrap_or("Error"), &dash.who, &body))
        }
    }
}

/// A page that could not be made: the HTTP status and one line.
struct PageError(StatusCode, String);

fn hub_err(s: tonic::Status) -> PageError {
    let code = if s.code() == tonic::Code::NotFound { StatusCode::NOT_FOUND } else { StatusCode::BAD_GATEWAY };
    PageError(code, status_line(s).to_string())
}

type Page = Result<(String, String), PageError>;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Percent-encodes a path segment (everything but unreserved characters).
pub fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(char::from(b));
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    Utc.timestamp_millis_opt(ms).single().map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

fn ago(ms: i64, now: DateTime<Utc>) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = (now.timestamp_millis() - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn layout(title: &str, who: &str, body: &str) -> String {
    let nav = [
        ("/", "Fleet"),
        ("/members", "Members"),
        ("/runs", "Runs"),
        ("/compliance", "Compliance"),
        ("/schedule", "Schedule"),
    ]
    .iter()
    .map(|(href, text)| format!("<a href=\"{href}\">{text}</a>"))
    .collect::<Vec<_>>()
    .join(" ");
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · upkeep</title><link rel=\"stylesheet\" href=\"/style.css\"></head>\n\
         <body><header><strong>upkeep</strong> <nav>{nav}</nav><span class=\"who\">{} · read-only</span></header>\n\
         <main>{body}</main></body></html>\n",
        esc(title),
        esc(who)
    )
}

/// A table: header cells and rows of already-escaped cell HTML; `row_attrs` gives each row's attributes.
fn table(head: &[&str], rows: &[(String, Vec<String>)]) -> String {
    let mut h = String::from("<table><thead><tr>");
    for c in head {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr></thead><tbody>");
    for (attrs, cells) in rows {
        let _ = write!(h, "<tr{attrs}>");
        for c in cells {
            h.push_str(c);
        }
        h.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(h, "<tr><td colspan=\"{}\" class=\"muted\">none</td></tr>", head.len());
    }
    h.push_str("</tbody></table>");
    h
}

fn td(class: &str, text: &str) -> String {
    format!("<td class=\"{class}\">{}</td>", esc(text))
}

fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", esc(href), esc(text))
}

fn status_td(status: &str) -> String {
    format!("<td class=\"status\" data-status=\"{0}\">{0}</td>", esc(status))
}

fn waiting_text(n: &v1::Node) -> String {
    match (n.waiting.as_str(), n.next_eligible_unix_ms) {
        ("", _) => String::new(),
        (w, 0) => w.to_string(),
        (w, t) => format!("{w} (next eligible {} UTC)", time(t)),
    }
}

async fn fleet_page(c: &mut Client) -> Page {
    let nodes = c.list_nodes(v1::ListNodesRequest::default()).await.map_err(hub_err)?.into_inner().nodes;
    let now = Utc::now();
    let rows = nodes
        .iter()
        .map(|n| {
            let r = n.report.clone().unwrap_or_default();
            let attrs = format!(" data-node=\"{}\"", esc(&r.node_name));
            (
                attrs,
                vec![
                    format!("<td class=\"name\">{}</td>", link(&format!("/nodes/{}", enc(&r.node_name)), &r.node_name)),
                    td("member", &r.member),
                    td("pool", &r.node_pool),
                    td("region", &r.region),
                    td("channel", &r.channel),
                    td("image", &r.node_image_version),
                    status_td(&n.status),
                    td("seen", &ago(n.last_seen_unix_ms, now)),
                    td("waiting", &waiting_text(n)),
                    td("behind", &n.behind),
                ],
            )
        })
        .collect::<Vec<_>>();
    let head = [
        "Node",
        "Member",
        "Pool",
        "Region",
        "Channel",
        "upkeep.io/node-image-version",
        "Status",
        "Last seen",
        "Waiting",
        "Behind",
    ];
    let ready = nodes.iter().filter(|n| n.status == "Ready").count();
    let body = format!(
        "<h1>Fleet</h1><p>{} nodes, {ready} Ready, {} behind their channel.</p>{}",
        nodes.len(),
        nodes.iter().filter(|n| !n.behind.is_empty()).count(),
        table(&head, &rows)
    );
    Ok(("Fleet".into(), body))
}

fn window_text(json: &str, now: DateTime<Utc>) -> String {
    if json.is_empty() {
        return "none (any time)".into();
    }
    let state = match serde_json::from_str::<upkeep_core::schedule::MaintenanceSchedule>(json) {
        Ok(s) => match s.window_at(now) {
            upkeep_core::schedule::WindowState::Open { closes_at } => {
                format!("open until {} UTC", closes_at.format("%Y-%m-%d %H:%M"))
            }
            upkeep_core::schedule::WindowState::Closed { next_opening: Some(t) } => {
                format!("closed, opens {} UTC", t.format("%Y-%m-%d %H:%M"))
            }
            upkeep_core::schedule::WindowState::Closed { next_opening: None } => "closed, no opening ahead".into(),
        },
        Err(_) => "unreadable".into(),
    };
    format!("{state}: {json}")
}

async fn members_page(c: &mut Client) -> Page {
    let members = c.list_members(v1::ListMembersRequest {}).await.map_err(hub_err)?.into_inner().members;
    let now = Utc::now();
    let mut rows = Vec::new();
    for m in &members {
        let req = v1::GetMemberRequest { name: m.name.clone() };
        let full = c.get_member(req.clone()).await.map_err(hub_err)?.into_inner();
        let s = c.get_member_settings(req).await.map_err(hub_err)?.into_inner();
        rows.push((
            format!(" data-member=\"{}\"", esc(&m.name)),
            vec![
                td("name", &m.name),
                td("nodes", &m.node_count.to_string()),
                td("channel", &m.node_os_channel),
                td("auto", &m.auto_upgrade_channel),
                td("channel-state", &full.auto_upgrade_status),
                td("budget", &s.max_unavailable),
                td("drain", &format!("{}s, {} (max {})", s.drain_timeout_seconds, s.undrainable, s.max_undrainable)),
                td("window", &window_text(&s.node_os_schedule_json, now)),
                td("window", &window_text(&s.cluster_schedule_json, now)),
            ],
        ));
    }
    let head = [
        "Member",
        "Nodes",
        "Node OS channel",
        "Auto-upgrade",
        "Channel state",
        "Max unavailable",
        "Drain",
        "Node OS window",
        "Cluster window",
    ];
    Ok(("Members".into(), format!("<h1>Members</h1>{}", table(&head, &rows))))
}

fn counts_text(c: Option<&v1::RunMemberCounts>) -> String {
    let c = c.cloned().unwrap_or_default();
    let mut s = format!("{}/{} done", c.completed + c.skipped, c.total);
    for (n, what) in [(c.running, "running"), (c.pending, "pending"), (c.failed, "failed")] {
        if n > 0 {
            let _ = write!(s, ", {n} {what}");
        }
    }
    s
}

async fn runs_page(c: &mut Client) -> Page {
    let runs = c.list_runs(v1::ListRunsRequest {}).await.map_err(hub_err)?.into_inner().runs;
    let rows = runs
        .iter()
        .map(|r| {
            let l = super::runs::run_level(r);
            (
                format!(" data-run=\"{}\"", esc(&r.name)),
                vec![
                    format!("<td class=\"name\">{}</td>", link(&format!("/runs/{}", enc(&r.name)), &r.name)),
                    status_td(&l.status),
                    td("type", &r.upgrade_type),
                    td("progress", &counts_text(r.counts.as_ref())),
                    td("started", &time(l.started_unix_ms)),
                    td("ended", &time(l.ended_unix_ms)),
                ],
            )
        })
        .collect::<Vec<_>>();
    let head = ["Run", "Status", "Upgrade", "Members", "Started (UTC)", "Ended (UTC)"];
    Ok(("Runs".into(), format!("<h1>Update runs</h1>{}", table(&head, &rows))))
}

/// One line of a run's tree: what the page shows and the live updates change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TreeRow {
    /// Stable key of the level: `run`, `stage/S`, `wait/S`, `group/S/G`, `member/M`.
    pub key: String,
    /// Nesting depth (0: the run).
    pub depth: u8,
    /// What the level is, e.g. `member m1`.
    pub label: String,
    /// Its status.
    pub status: String,
    /// Members done of members (run, stage, group) or nodes done of nodes (member).
    pub progress: String,
    /// Started, UTC.
    pub started: String,
    /// Ended, UTC.
    pub ended: String,
    /// What it is doing or why it waits, and its error.
    pub message: String,
}

fn row(key: String, depth: u8, label: String, l: Option<&v1::RunLevel>, progress: String) -> TreeRow {
    let l = l.cloned().unwrap_or_default();
    let message = match &l.error {
        Some(e) if !e.is_empty() => format!("{} error: {e}", l.message).trim_start().to_string(),
        _ => l.message.clone(),
    };
    TreeRow {
        key,
        depth,
        label,
        status: l.status,
        progress,
        started: time(l.started_unix_ms),
        ended: time(l.ended_unix_ms),
        message,
    }
}

/// The run's tree as rows, in display order.
pub fn tree_rows(r: &v1::Run) -> Vec<TreeRow> {
    let mut rows =
        vec![row("run".into(), 0, format!("run {}", r.name), r.level.as_ref(), counts_text(r.counts.as_ref()))];
    for st in &r.stages {
        let progress = counts_text(st.counts.as_ref());
        rows.push(row(format!("stage/{}", st.name), 1, format!("stage {}", st.name), st.level.as_ref(), progress));
        for g in &st.groups {
            let progress = counts_text(g.counts.as_ref());
            let key = format!("group/{}/{}", st.name, g.name);
            rows.push(row(key, 2, format!("group {}", g.name), g.level.as_ref(), progress));
            for m in &g.members {
                let progress = match &m.nodes {
                    Some(p) => {
                        let mut s = format!("{}/{} nodes", p.done + p.skipped, p.total);
                        if p.failed > 0 {
                            let _ = write!(s, ", {} failed", p.failed);
                        }
                        s
                    }
                    None => String::new(),
                };
                rows.push(row(
                    format!("member/{}", m.name),
                    3,
                    format!("member {}", m.name),
                    m.level.as_ref(),
                    progress,
                ));
            }
        }
        if st.after_stage_wait_seconds > 0 {
            let label = format!("wait {}s", st.after_stage_wait_seconds);
            rows.push(row(format!("wait/{}", st.name), 2, label, st.after_stage_wait.as_ref(), String::new()));
        }
    }
    rows
}

async fn run_page(c: &mut Client, name: &str) -> Page {
    let r = c.get_run(v1::RunNameRequest { name: name.to_string() }).await.map_err(hub_err)?.into_inner();
    let rows: Vec<(String, Vec<String>)> = tree_rows(&r)
        .into_iter()
        .map(|t| {
            (
                format!(" data-level=\"{}\" class=\"d{}\"", esc(&t.key), t.depth),
                vec![
                    td("label", &t.label),
                    status_td(&t.status),
                    td("progress", &t.progress),
                    td("started", &t.started),
                    td("ended", &t.ended),
                    td("message", &t.message),
                ],
            )
        })
        .collect();
    let target = if r.kubernetes_version.is_empty() {
        r.upgrade_type.clone()
    } else {
        format!("{} to Kubernetes {}", r.upgrade_type, r.kubernetes_version)
    };
    let mode = r.node_image_selection.as_ref().map(|s| s.mode.clone()).unwrap_or_default();
    let strategy = if r.strategy_name.is_empty() { String::new() } else { format!(", strategy {}", r.strategy_name) };
    let mut selected = String::new();
    for (f, v) in r.selected_images.iter().collect::<std::collections::BTreeMap<_, _>>() {
        let _ = write!(selected, "<li>selected image {}</li>", esc(&format!("{f}-{v}")));
    }
    let body = format!(
        "<h1>Run {}</h1><p>{}</p><ul>{selected}</ul>\
         <section data-live=\"/runs/{}/events\"><p class=\"live muted\" id=\"live-state\">\
         Shown as of page load (live updates need JavaScript).</p>{}</section>\
         <script src=\"/live.js\" defer></script>",
        esc(&r.name),
        esc(&format!("{target}, node images {mode}{strategy}")),
        esc(&enc(&r.name)),
        table(&["Level", "Status", "Progress", "Started (UTC)", "Ended (UTC)", "Message"], &rows)
    );
    Ok((format!("Run {}", r.name), body))
}

/// `GET /runs/NAME/events`: Server-Sent Events. On connect and after every (coalesced) burst of the hub's
/// `WatchRun` events, one `run` event with the tree's rows as JSON; `end` when the run is final.
fn run_events(c: Client, name: String) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(follow(c, name, tx));
    let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
        Ok::<_, Infallible>(Frame::data(b))
    });
    let mut r = full(StatusCode::OK, "text/event-stream; charset=utf-8", Bytes::new());
    *r.body_mut() = StreamBody::new(stream).boxed();
    r
}

fn sse(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

async fn follow(mut c: Client, name: String, tx: tokio::sync::mpsc::Sender<Bytes>) {
    let send_state = |c: &mut Client| {
        let mut c = c.clone();
        let name = name.clone();
        async move {
            match c.get_run(v1::RunNameRequest { name }).await {
                Ok(r) => {
                    let rows = tree_rows(&r.into_inner());
                    sse("run", &serde_json::json!({ "rows": rows }).to_string())
                }
                Err(s) => sse("problem", &serde_json::json!({ "error": status_line(s).to_string() }).to_string()),
            }
        }
    };
    if tx.send(send_state(&mut c).await).await.is_err() {
        return;
    }
    let mut stream = match c.watch_run(v1::WatchRunRequest { name: name.clone(), from_seq: 0 }).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            let _ =
                tx.send(sse("problem", &serde_json::json!({ "error": status_line(s).to_string() }).to_string())).await;
            return;
        }
    };
    loop {
        match tokio::time::timeout(KEEPALIVE, stream.message()).await {
            Err(_) => {
                if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => break,
            Ok(Err(s)) => {
                let _ = tx
                    .send(sse("problem", &serde_json::json!({ "error": status_line(s).to_string() }).to_string()))
                    .await;
                return;
            }
        }
        // Take whatever else arrives right behind it, then show the tree once.
        let mut ended = false;
        while let Ok(next) = tokio::time::timeout(COALESCE, stream.message()).await {
            match next {
                Ok(Some(_)) => {}
                _ => {
                    ended = true;
                    break;
                }
            }
        }
        if tx.send(send_state(&mut c).await).await.is_err() {
            return;
        }
        if ended {
            break;
        }
    }
    let _ = tx.send(send_state(&mut c).await).await;
    let _ = tx.send(sse("end", "{}")).await;
}

async fn node_page(c: &mut Client, name: &str) -> Page {
    let n = c.get_node(v1::GetNodeRequest { name: name.to_string() }).await.map_err(hub_err)?.into_inner();
    let r = n.report.clone().unwrap_or_default();
    let leases = c.list_leases(v1::ListLeasesRequest { member: r.member.clone() }).await.map_err(hub_err)?;
    let leases: Vec<v1::Lease> = leases.into_inner().leases.into_iter().filter(|l| l.node == r.node_name).collect();
    let now = Utc::now();
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let facts: Vec<(&str, String)> = vec![
        ("Status", n.status.clone()),
        ("Connected", yes(n.connected)),
        ("Last seen", format!("{} UTC ({})", time(n.last_seen_unix_ms), ago(n.last_seen_unix_ms, now))),
        ("Last report", format!("{} UTC", time(n.last_report_unix_ms))),
        ("First seen", format!("{} UTC", time(n.first_seen_unix_ms))),
        ("Member", r.member.clone()),
        ("Node pool", r.node_pool.clone()),
        ("Region", r.region.clone()),
        ("Channel", r.channel.clone()),
        ("Channel note", r.channel_note.clone()),
        ("upkeep.io/node-image-version", r.node_image_version.clone()),
        ("Booted image", r.booted_image_version.clone()),
        ("upkeep.io/security-patch-version", r.security_patch_version.clone()),
        ("OS", format!("{} {} (kernel {})", r.os_family, r.os_version, r.kernel)),
        ("Kubernetes", r.kubernetes_version.clone()),
        ("Control plane", yes(r.control_plane)),
        ("Hardware class", r.hardware_class.clone()),
        ("Reboot required", yes(r.reboot_required)),
        ("Agent", r.agent_version.clone()),
        ("Waiting", waiting_text(&n)),
        ("Behind", n.behind.clone()),
        ("Out of service", n.out_of_service.clone()),
    ];
    let mut dl = String::from("<dl class=\"facts\">");
    for (k, v) in facts {
        let _ = write!(
            dl,
            "<dt>{}</dt><dd data-fact=\"{}\">{}</dd>",
            esc(k),
            esc(k),
            esc(if v.is_empty() { "-" } else { &v })
        );
    }
    dl.push_str("</dl>");
    let ops: Vec<(String, Vec<String>)> = r
        .operations
        .iter()
        .map(|o| {
            (
                String::new(),
                vec![td("id", &o.operation_id), td("kind", &o.kind), td("step", &o.step), td("state", &o.state)],
            )
        })
        .collect();
    let lease_rows: Vec<(String, Vec<String>)> = leases
        .iter()
        .map(|l| {
            (
                String::new(),
                vec![
                    td("holder", &l.holder),
                    td("purpose", &l.purpose),
                    td("id", &l.lease_id),
                    td("granted", &time(l.granted_unix_ms)),
                    td("expires", &time(l.expires_unix_ms)),
                    td("forced", &yes(l.forced)),
                ],
            )
        })
        .collect();
    let history: Vec<(String, Vec<String>)> = n
        .history
        .iter()
        .map(|h| {
            (
                format!(" data-work=\"{}\"", esc(&h.work_id)),
                vec![
                    td("started", &time(h.started_unix_ms)),
                    td("finished", &time(h.finished_unix_ms)),
                    td("work", &h.work_id),
                    td("purpose", &h.purpose),
                    status_td(&h.outcome),
                    td("detail", &h.detail),
                ],
            )
        })
        .collect();
    let body = format!(
        "<h1>Node {}</h1>{dl}<h2>Operations in flight</h2>{}<h2>Leases</h2>{}<h2>History</h2>{}",
        esc(&r.node_name),
        table(&["Operation", "Kind", "Step", "State"], &ops),
        table(&["Holder", "Purpose", "Lease", "Granted (UTC)", "Expires (UTC)", "Forced"], &lease_rows),
        table(&["Started (UTC)", "Finished (UTC)", "Work", "Purpose", "Outcome", "Detail"], &history)
    );
    Ok((format!("Node {}", r.node_name), body))
}

async fn compliance_page(c: &mut Client) -> Page {
    let nodes = c.list_nodes(v1::ListNodesRequest::default()).await.map_err(hub_err)?.into_inner().nodes;
    let members = c.list_members(v1::ListMembersRequest {}).await.map_err(hub_err)?.into_inner().members;
    let mut body = String::from("<h1>Compliance</h1><p>Nodes behind what their member's channel wants.</p>");
    let mut summary = Vec::new();
    let mut details = String::new();
    for m in &members {
        let of: Vec<&v1::Node> =
            nodes.iter().filter(|n| n.report.as_ref().is_some_and(|r| r.member == m.name)).collect();
        let behind: Vec<&&v1::Node> = of.iter().filter(|n| !n.behind.is_empty()).collect();
        summary.push((
            format!(" data-member=\"{}\"", esc(&m.name)),
            vec![
                td("name", &m.name),
                td("channel", &m.node_os_channel),
                td("nodes", &of.len().to_string()),
                td("current", &(of.len() - behind.len()).to_string()),
                td("behind", &behind.len().to_string()),
            ],
        ));
        if !behind.is_empty() {
            let rows: Vec<(String, Vec<String>)> = behind
                .iter()
                .map(|n| {
                    let r = n.report.clone().unwrap_or_default();
                    (
                        format!(" data-node=\"{}\"", esc(&r.node_name)),
                        vec![
                            format!(
                                "<td class=\"name\">{}</td>",
                                link(&format!("/nodes/{}", enc(&r.node_name)), &r.node_name)
                            ),
                            td("image", &r.node_image_version),
                            td("behind", &n.behind),
                            td("waiting", &waiting_text(n)),
                        ],
                    )
                })
                .collect();
            let _ = write!(
                details,
                "<h2>{}</h2>{}",
                esc(&format!("Member {}", m.name)),
                table(&["Node", "upkeep.io/node-image-version", "Behind", "Waiting"], &rows)
            );
        }
    }
    body.push_str(&table(&["Member", "Node OS channel", "Nodes", "Current", "Behind"], &summary));
    body.push_str(&details);
    Ok(("Compliance".into(), body))
}

/// Advance notice: what the hub predicts for the next seven days (`upkeepctl schedule`, docs/schedules.md).
async fn schedule_page(c: &mut Client) -> Page {
    let s =
        c.get_schedule(v1::GetScheduleRequest { days: 7, ..Default::default() }).await.map_err(hub_err)?.into_inner();
    let mut body = format!(
        "<h1>Schedule</h1><p>What will happen until {} (UTC), at the earliest: update-run members, channel \
         rollouts (one batch per <code>max_unavailable</code>, 600 s a batch assumed), reboots the OS asks for.</p>",
        esc(&time(s.horizon_unix_ms))
    );
    let rows: Vec<(String, Vec<String>)> = s
        .operations
        .iter()
        .map(|o| {
            let node = if o.node.is_empty() {
                td("node muted", "whole member")
            } else {
                format!("<td class=\"node\">{}</td>", link(&format!("/nodes/{}", enc(&o.node)), &o.node))
            };
            let when = if o.earliest_unix_ms == 0 { "unknown".to_string() } else { time(o.earliest_unix_ms) };
            let batch = if o.batches > 0 { format!("{}/{}", o.batch, o.batches) } else { "-".into() };
            (
                format!(" data-member=\"{}\" data-node=\"{}\"", esc(&o.member), esc(&o.node)),
                vec![
                    td("earliest", &when),
                    td("member", &o.member),
                    node,
                    td("source", &o.source),
                    td("operation", &o.operation),
                    td("batch", &batch),
                    td("why", &o.why),
                ],
            )
        })
        .collect();
    body.push_str(&table(&["Earliest (UTC)", "Member", "Node", "Source", "Operation", "Batch", "Why"], &rows));
    Ok(("Schedule".into(), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escaping_covers_every_special_character() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(esc("plain m1-eu"), "plain m1-eu");
    }

    #[test]
    fn path_segments_round_trip() {
        for s in ["m1", "a b/c", "ü<\"%"] {
            assert_eq!(decode(&enc(s)), s);
        }
        assert_eq!(enc("a/b"), "a%2Fb");
    }

    #[test]
    fn only_loopback_unless_allowed() {
        let args = |listen: &str, allow_remote| DashboardArgs { listen: listen.into(), allow_remote };
        assert!(listen_addr(&args("127.0.0.1:0", false)).is_ok());
        assert!(listen_addr(&args("[::1]:8080", false)).is_ok());
        let err = listen_addr(&args("0.0.0.0:8080", false)).expect_err("refused").to_string();
        assert!(err.contains("--listen") && err.contains("--allow-remote"), "{err}");
        assert!(listen_addr(&args("0.0.0.0:8080", true)).is_ok());
        let err = listen_addr(&args("localhost", false)).expect_err("refused").to_string();
        assert!(err.contains("IP:PORT"), "{err}");
    }

    #[test]
    fn run_rows_carry_every_level_with_its_progress() {
        let member = |name: &str, status: &str, nodes: Option<(u32, u32)>| v1::RunMember {
            name: name.into(),
            level: Some(v1::RunLevel { status: status.into(), ..Default::default() }),
            nodes: nodes.map(|(done, total)| v1::RunNodeProgress { done, total, ..Default::default() }),
            ..Default::default()
        };
        let r = v1::Run {
            name: "r<1>".into(),
            level: Some(v1::RunLevel { status: "Running".into(), ..Default::default() }),
            counts: Some(v1::RunMemberCounts { total: 2, completed: 1, running: 1, ..Default::default() }),
            stages: vec![v1::RunStage {
                name: "s".into(),
                after_stage_wait_seconds: 30,
                groups: vec![v1::RunGroup {
                    name: "g".into(),
                    members: vec![member("m1", "Completed", None), member("m2", "Running", Some((1, 3)))],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let rows = tree_rows(&r);
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["run", "stage/s", "group/s/g", "member/m1", "member/m2", "wait/s"]);
        assert_eq!(rows[0].progress, "1/2 done, 1 running");
        assert_eq!(rows[4].progress, "1/3 nodes");
        assert_eq!(rows[4].status, "Running");
    }
}
