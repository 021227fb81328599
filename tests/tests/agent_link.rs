//! The agent's hub link without HTTP/2 keep-alive pings: a hub that drops off the network (no FIN, no RST, its
//! packets simply stop) is noticed within the bound `upkeep_agent::hub_socket` promises, one heartbeat plus the
//! TCP user timeout, and the agent connects again.
//!
//! Losing packets takes a network of our own: the test thread enters a new network namespace (root, like the
//! system tier) and drops the agent's packets with a blackhole routing rule (`ip`, iproute2).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use upkeep_tests::*;

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_hub_gone_silent_on_the_network_is_noticed_without_pings_and_the_agent_connects_again() {
    let scenario = std::thread::spawn(|| {
        // Namespaces are per thread: this one, and the processes and threads it starts, get a loopback of their
        // own; the rest of the test binary keeps the host's.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace for this thread (run as root)");
        ip(&["link", "set", "lo", "up"]);
        // Local addresses are looked up at rule 0; moving that lookup to rule 1 lets a rule 0 drop packets first.
        ip(&["rule", "add", "pref", "1", "table", "local"]);
        ip(&["rule", "del", "pref", "0", "table", "local"]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(hub_goes_silent());
    });
    if let Err(panic) = scenario.join() {
        std::panic::resume_unwind(panic);
    }
}

async fn hub_goes_silent() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let mut hub = TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    // A forwarder in front of the hub counts the agent's connections and tells where each comes from.
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front_port = front.local_addr().expect("addr").port();
    let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hub_addr = hub.addr;
    {
        let peers = peers.clone();
        tokio::spawn(async move {
            while let Ok((mut agent_side, peer)) = front.accept().await {
                peers.lock().expect("lock").push(peer);
                tokio::spawn(async move {
                    if let Ok(mut hub_side) = TcpStream::connect(hub_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut agent_side, &mut hub_side).await;
                    }
                });
            }
        });
    }
    let connections = || peers.lock().expect("lock").len();
    let node = make_node(
        &pki,
        work.path(),
        &format!("https://127.0.0.1:{front_port}"),
        "node-s",
        "m1",
        "pool1",
        "eu-west",
        "Ubuntu-2204gen2-202311.07.0",
    );
    let agent = TestAgent::start(&node);
    let fleet = hub.fleet();
    wait_for("node-s registered", Duration::from_secs(30), || async { fleet.is_connected("node-s").then_some(()) })
        .await;
    assert_eq!(connections(), 1);
    // The Welcome's 1 s heartbeat gives the socket its 5 s user timeout at the next write, a heartbeat at most
    // 1 s later; nothing outside the agent shows that write, so this one wait is a plain sleep.
    let first = peers.lock().expect("lock")[0];
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Every packet of the agent's connection now vanishes on its way: the hub neither answers nor closes. Only
    // this connection: a new one gets through.
    let sport = first.port().to_string();
    let dport = front_port.to_string();
    ip(&["rule", "add", "pref", "0", "ipproto", "tcp", "sport", &sport, "dport", &dport, "blackhole"]);
    let silent_since = Instant::now();

    // Bound: the next heartbeat (1 s) stays unacknowledged for the user timeout (5 s), the kernel gives the
    // connection up, the agent reconnects after its first backoff (<= 200 ms). Without it (HTTP/2 pings off and
    // no user timeout) the agent would wait for the hub's own keep-alive: 30 s of silence plus 10 s.
    wait_for("the agent's second connection", Duration::from_secs(10), || async { (connections() >= 2).then_some(()) })
        .await;
    let noticed = silent_since.elapsed();
    assert!(noticed >= Duration::from_secs(4), "noticed after {noticed:?}: too early to be the user timeout");
    ip(&["rule", "del", "pref", "0"]);
    agent.stop().await;
    hub.stop().await;
}
