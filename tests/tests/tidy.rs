//! Tidy checks: architectural invariants that a grep can verify (see ARCHITECTURE.md).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Lines of non-comment code containing `needle`, as `path:line`.
fn offenders(dir: &Path, needles: &[&str], allow: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let mut hits = Vec::new();
    for f in files.iter().filter(|f| !allow(f)) {
        let text = std::fs::read_to_string(f).expect("read");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for n in needles {
                if code.contains(n) {
                    hits.push(format!("{}:{}: {n}", f.display(), i + 1));
                }
            }
        }
    }
    hits
}

#[test]
fn core_is_pure() {
    let hits = offenders(
        &workspace().join("core/src"),
        &["std::fs", "std::process", "std::net", "tokio", "Utc::now", "SystemTime::now", "Local::now", "rand::"],
        |_| false,
    );
    assert!(hits.is_empty(), "core must do no I/O and never read the clock:\n{}", hits.join("\n"));
}

#[test]
fn agent_commands_only_in_os() {
    let os_dir = workspace().join("agent/src/os");
    let hits =
        offenders(&workspace().join("agent/src"), &["Command::new", "process::Command"], |p| p.starts_with(&os_dir));
    assert!(hits.is_empty(), "agent side effects go through NodeOs (agent/src/os):\n{}", hits.join("\n"));
}

/// Like `offenders`, but a file's test module (from its `#[cfg(test)]` line on) is not looked at.
fn offenders_outside_tests(dir: &Path, needles: &[&str], allow: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let mut hits = Vec::new();
    for f in files.iter().filter(|f| !allow(f)) {
        let text = std::fs::read_to_string(f).expect("read");
        for (i, line) in text.lines().enumerate().take_while(|(_, l)| l.trim() != "#[cfg(test)]") {
            let code = line.split("//").next().unwrap_or("");
            for n in needles.iter().filter(|n| code.contains(**n)) {
                hits.push(format!("{}:{}: {n}", f.display(), i + 1));
            }
        }
    }
    hits
}

#[test]
fn the_agent_touches_the_machine_only_through_node_os() {
    let src = workspace().join("agent/src");
    // The agent's own plumbing, which is not the node: its configuration file, its state and journal (atomic
    // writes under its state directory), its connection to the hub, `join` (enrollment: its key, certificate and
    // configuration, before the agent runs), `renew` (rotating its own key and certificate) and `man --dir` writing
    // man pages. Test files are test code.
    let own = [
        "config.rs",
        "state.rs",
        "journal.rs",
        "hub_socket.rs",
        "join.rs",
        "renew.rs",
        "main.rs",
        "engine/tests.rs",
        "engine/kube_tests.rs",
    ];
    let os_dir = src.join("os");
    let hits =
        offenders_outside_tests(&src, &["std::fs", "tokio::fs", "std::net", "tokio::net", "Command::new"], |p| {
            p.starts_with(&os_dir) || own.iter().any(|o| p.ends_with(o))
        });
    assert!(
        hits.is_empty(),
        "the agent reads and changes the node through NodeOs (agent/src/os) only:\n{}",
        hits.join("\n")
    );
}

#[test]
fn tidy_check_can_fail() {
    // The checker itself must find a planted offender, or the two checks above prove nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("x.rs"), "fn f() { let _ = std::fs::read(\"x\"); }\n// std::net in a comment\n")
        .expect("write");
    let hits = offenders(dir.path(), &["std::fs", "std::net"], |_| false);
    assert_eq!(hits.len(), 1, "{hits:?}");
    std::fs::write(
        dir.path().join("y.rs"),
        "fn g() { let _ = std::net::TcpStream::connect(\"x\"); }\n#[cfg(test)]\nmod tests { fn t() { std::fs::read(\"x\"); } }\n",
    )
    .expect("write");
    let hits = offenders_outside_tests(dir.path(), &["std::fs", "std::net"], |p| p.ends_with("x.rs"));
    assert_eq!(hits.len(), 1, "the connect, not the test module's read: {hits:?}");
}

/// The RPCs of `service NAME { ... }` in a proto file, as the snake_case names of their handlers.
fn rpcs(proto: &str, service: &str) -> Vec<String> {
    let start = proto.find(&format!("service {service} {{")).unwrap_or_else(|| panic!("service {service}"));
    let body = &proto[start..start + proto[start..].find("\n}").expect("service end")];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| {
            let name = l.split('(').next().expect("rpc name").trim();
            let mut snake = String::new();
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            snake
        })
        .collect()
}

/// Handlers in `impl ... for` block `header` of `source` that do not start with the principal check: their first
/// statement must read the principal from the client certificate (`principal_of`) and the check of its role
/// (`require`) must follow at once. Returns (handlers found, offenders).
fn unchecked_handlers(source: &str, header: &str) -> (Vec<String>, Vec<String>) {
    let start = source.find(header).unwrap_or_else(|| panic!("{header}"));
    let block = &source[start..];
    // The impl block ends at the first line that is exactly "}".
    let block = &block[..block.find("\n}\n").map_or(block.len(), |e| e + 1)];
    let mut found = Vec::new();
    let mut bad = Vec::new();
    let mut rest = block;
    while let Some(at) = rest.find("    async fn ") {
        let sig = &rest[at + "    async fn ".len()..];
        let name = sig.split(['(', '<']).next().expect("fn name").trim().to_string();
        // The body starts after the signature's `{` at the end of a line.
        let open = sig.find("{\n").expect("fn body");
        let body = &sig[open + 2..];
        let statements: Vec<&str> =
            body.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("//")).take(2).collect();
        let first = statements.first().copied().unwrap_or("");
        let checked = first.contains("principal_of(")
            && (first.contains("require(") || statements.get(1).is_some_and(|s| s.starts_with("require(")));
        if !checked {
            bad.push(format!("{name}: starts with {statements:?}"));
        }
        found.push(name);
        rest = &sig[open..];
    }
    (found, bad)
}

#[test]
fn every_handler_starts_with_the_principal_check() {
    let root = workspace();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
    for (proto, service, source, header) in [
        (
            "proto/proto/upkeep/v1/operator.proto",
            "OperatorService",
            "hub/src/grpc/operator.rs",
            "impl v1::operator_service_server::OperatorService for OperatorApi {",
        ),
        (
            "proto/proto/upkeep/v1/agent.proto",
            "AgentService",
            "hub/src/grpc/agent.rs",
            "impl v1::agent_service_server::AgentService for AgentApi {",
        ),
    ] {
        let (mut found, bad) = unchecked_handlers(&read(source), header);
        assert!(bad.is_empty(), "{source}: handlers without the principal check first:\n{}", bad.join("\n"));
        let mut want = rpcs(&read(proto), service);
        found.sort();
        want.sort();
        assert_eq!(found, want, "{source}: every {service} RPC has a handler, and the check saw each one");
    }
}

/// The one service served without a client certificate: `Join` must start with the token check and
/// `CaCertificate` serves only the public CA; every RPC of join.proto is one of those two.
#[test]
fn the_join_service_authenticates_by_token() {
    let root = workspace();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
    let source = read("hub/src/grpc/join.rs");
    let header = "impl v1::join_service_server::JoinService for JoinApi {";
    let start = source.find(header).expect("JoinService impl");
    let block = &source[start..];
    let block = &block[..block.find("\n}\n").map_or(block.len(), |e| e + 1)];
    let first_statement = |name: &str| -> String {
        let at = block.find(&format!("    async fn {name}(")).unwrap_or_else(|| panic!("handler {name}"));
        let body = &block[at..];
        let body = &body[body.find("{\n").expect("body") + 2..];
        body.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("//")).unwrap_or("").to_string()
    };
    let join = first_statement("join");
    assert!(join.contains("self.check_token(&req)?"), "join must start with the token check: {join:?}");
    let ca = first_statement("ca_certificate");
    assert!(ca.starts_with("public_ca_only(&req)"), "ca_certificate must serve the public CA only: {ca:?}");
    let mut want = rpcs(&read("proto/proto/upkeep/v1/join.proto"), "JoinService");
    want.sort();
    assert_eq!(want, vec!["ca_certificate", "join"], "a new JoinService RPC needs its own check here");
}

#[test]
fn the_principal_check_finds_a_handler_without_it() {
    let source = "impl S for A {\n    async fn ok(&self, req: R) -> X {\n        let p = principal_of(&req)?;\n        \
                  require(&p, W, \"x\")?;\n    }\n\n    async fn open(&self, req: R) -> X {\n        // none\n        \
                  Ok(x)\n    }\n}\n";
    let (found, bad) = unchecked_handlers(source, "impl S for A {");
    assert_eq!(found, vec!["ok", "open"]);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].starts_with("open"), "{bad:?}");
}
