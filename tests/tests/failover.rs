//! Several hub addresses (issue 16 item 3): an agent configured with `hub = [A, B, ...]` skips a replica it
//! cannot reach without waiting out a backoff, and when the hub it talks to goes away it registers with another
//! replica within the backoff cap; upkeepctl takes `--hub a,b` the same way.

use std::time::{Duration, Instant};
use upkeep_tests::system::free_port;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(60);
/// The agent's reconnect backoff cap (README: "capped at 30 s").
const BACKOFF_CAP: Duration = Duration::from_secs(30);

async fn ready_on(pki: &TestPki, hub: &str, node: &str) -> Option<()> {
    let list = upkeepctl_json(pki, hub, &["node", "list"]).await.ok()?;
    list["nodes"]
        .as_array()?
        .iter()
        .any(|n| n["name"] == node && n["status"] == "Ready" && n["connected"] == true)
        .then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_several_hub_addresses_skips_a_dead_one_and_fails_over_when_its_hub_goes() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let any = || "127.0.0.1:0".parse().expect("addr");
    let mut a = TestHub::start(&pki, &work.path().join("hub-a"), any()).await;
    let mut b = TestHub::start(&pki, &work.path().join("hub-b"), any()).await;
    // Nothing listens here: the first address in the list is a replica that is down.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let node = make_node(&pki, work.path(), &a.url(), "n1", "m1", "pool1", "eu", "Debian-12-202311.07.0");
    let cfg = std::fs::read_to_string(&node.config).expect("agent.toml");
    let cfg =
        cfg.replacen(&format!("hub = {:?}", a.url()), &format!("hub = [{dead:?}, {:?}, {:?}]", a.url(), b.url()), 1);
    assert!(cfg.contains(&dead), "the hub line was rewritten: {cfg}");
    std::fs::write(&node.config, cfg).expect("agent.toml");

    let (a_url, b_url) = (a.url(), b.url());
    let started = Instant::now();
    let agent = TestAgent::start(&node);
    wait_for("n1 registered with hub A after skipping the dead address", WAIT, || ready_on(&pki, &a_url, "n1")).await;
    // The dead replica costs a refused connection: the agent tries the next at once (the bound is loose, for a
    // loaded machine; the printed figure is the measurement).
    let first = started.elapsed();
    assert!(first < Duration::from_secs(5), "took {first:?} to get past the dead replica");
    assert!(ready_on(&pki, &b.url(), "n1").await.is_none(), "one session at a time");

    // Hub A goes away: the agent registers with B (the next replica) within the backoff cap.
    let gone = Instant::now();
    a.stop().await;
    wait_for("n1 registered with hub B", WAIT, || ready_on(&pki, &b_url, "n1")).await;
    let failover = gone.elapsed();
    assert!(failover < BACKOFF_CAP, "failover took {failover:?}");
    println!("failover: first registration {first:?}, hub A stopped -> registered with B {failover:?}");

    // upkeepctl: replicas in order, an unreachable one skipped; none reachable is one line naming each.
    let both = format!("{dead},{}", b.url());
    let list = upkeepctl_json(&pki, &both, &["node", "list"]).await.expect("node list through the second address");
    assert_eq!(list["nodes"][0]["name"], "n1");
    let dead2 = format!("https://127.0.0.1:{}", free_port());
    let out = upkeepctl(&pki, &format!("{dead},{dead2}"), "operator", &["node", "list"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&dead) && err.contains(&dead2), "names every replica tried: {err}");
    let out = upkeepctl(&pki, &format!("{dead},http://127.0.0.1:1"), "operator", &["node", "list"]).await;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success() && err.contains("--hub [1]") && err.contains("https"), "{err}");

    agent.stop().await;
    b.stop().await;
}
