//! Bad input stops at the door (SPEC §7; ENGINEERING.md): bounds on waits and timestamps, unknown keys, document
//! size and depth, capped error lists and cut values — through the real hub and upkeepctl — and a stored state out
//! of bounds never panics the hub or wedges a run.

use serde_json::Value;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use upkeep_hub::pki::files;
use upkeep_hub::store::runparts::{self, RunWrite};
use upkeep_proto::v1;
use upkeep_tests::*;

const WAIT: Duration = Duration::from_secs(60);

struct Fleet {
    pki: TestPki,
    work: tempfile::TempDir,
    hub: TestHub,
    agents: Vec<TestAgent>,
}

async fn fleet(nodes: &[(&str, &str, &str)]) -> Fleet {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let hub = TestHub::start(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr")).await;
    let mut agents = Vec::new();
    for (name, member, region) in nodes {
        let node = make_node(&pki, work.path(), &hub.url(), name, member, "pool1", region, "Debian-12-202311.07.0");
        agents.push(TestAgent::start(&node));
    }
    let want = nodes.len();
    wait_for("every node registered", WAIT, || async {
        let list = upkeepctl_json(&pki, &hub.url(), &["node", "list"]).await.ok()?;
        (list["nodes"].as_array()?.iter().filter(|n| n["status"] == "Ready").count() == want).then_some(())
    })
    .await;
    Fleet { pki, work, hub, agents }
}

impl Fleet {
    async fn ok(&self, args: &[&str]) -> String {
        upkeepctl_ok(&self.pki, &self.hub.url(), args).await
    }

    async fn refused(&self, args: &[&str]) -> String {
        upkeepctl_refused(&self.pki, &self.hub.url(), args).await
    }

    async fn json(&self, args: &[&str]) -> Value {
        upkeepctl_json(&self.pki, &self.hub.url(), args).await.expect("json")
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.work.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    }

    async fn client(&self) -> v1::operator_service_client::OperatorServiceClient<tonic::transport::Channel> {
        let ca = std::fs::read(self.pki.file(files::CA_CERT)).expect("ca");
        let cert = std::fs::read(self.pki.file(files::OPERATOR_CERT)).expect("cert");
        let key = std::fs::read(self.pki.file(files::OPERATOR_KEY)).expect("key");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("127.0.0.1")
            .identity(Identity::from_pem(cert, key));
        let ch = Endpoint::from_shared(self.hub.url())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        v1::operator_service_client::OperatorServiceClient::new(ch)
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        let mut hub = self.hub;
        hub.stop().await;
    }
}

async fn publish_trusted(f: &Fleet, nodes: &[&str], version: &str) {
    let keys = f.work.path().join("keys");
    f.ok(&["image", "keygen", "--dir", &keys.to_string_lossy()]).await;
    for n in nodes {
        let dir = f.work.path().join(n).join("root/etc/upkeep/trusted-keys");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(keys.join("upkeep-image.pub"), dir.join("upkeep-image.pub")).expect("trust key");
    }
    let img = f.work.path().join(format!("debian-{version}.tar"));
    let img = img.to_string_lossy().into_owned();
    f.ok(&["image", "build", "--out", &img, "--family", "Debian-12", "--version", version]).await;
    f.ok(&["image", "sign", "--key", &keys.join("upkeep-image.key").to_string_lossy(), &img]).await;
    f.ok(&["image", "publish", "--family", "Debian-12", "--version", version, "--regions", "eu", "--file", &img]).await;
}

fn strategy_with_wait(wait: &str) -> String {
    format!(
        r#"{{"stages":[{{"name":"canary","groups":[{{"name":"g","members":["m1"]}}],"after_stage_wait_seconds":{wait}}},
            {{"name":"prod","groups":[{{"name":"g","members":["m2"]}}]}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec7_out_of_bounds_numbers_and_unknown_keys_are_refused_naming_the_field() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "eu")]).await;
    // A wait past 30 days, in a strategy and in an inline run.
    let huge = f.file("huge.json", &strategy_with_wait("9223372036854775807"));
    let err = f.refused(&["strategy", "create", "huge", "-f", &huge]).await;
    assert!(err.contains("strategy.stages[0].after_stage_wait_seconds") && err.contains("30 days"), "{err}");
    let err = f.refused(&["run", "create", "r", "-f", &huge, "--upgrade-type", "NodeImageOnly"]).await;
    assert!(err.contains("after_stage_wait_seconds") && err.contains("at most 2592000"), "{err}");
    // A misspelt key, in JSON and in YAML, is refused naming it and the keys that are known.
    let misspelt =
        f.file("misspelt.json", &strategy_with_wait("60").replace("after_stage_wait_seconds", "after_stage_wait_secs"));
    let err = f.refused(&["strategy", "create", "misspelt", "-f", &misspelt]).await;
    assert!(err.contains("unknown field `after_stage_wait_secs`") && err.contains("after_stage_wait_seconds"), "{err}");
    let yaml = f.file(
        "misspelt.yaml",
        "stages:\n  - name: canary\n    groups:\n      - name: g\n        members: [m1]\n        max_concurency: 2\n",
    );
    let err = f.refused(&["strategy", "create", "misspelt", "-f", &yaml]).await;
    assert!(err.contains("unknown field `max_concurency`"), "{err}");
    let window = f.file(
        "window.yaml",
        "frequency: {type: Weekly, interval_weeks: 1, day_of_week: Monday}\nstart_time: \"22:00\"\nduration_hour: 4\n",
    );
    let err = f.refused(&["member", "set-window", "m1", "--kind", "node-os", "-f", &window]).await;
    assert!(err.contains("unknown field `duration_hour`"), "{err}");
    let err = f.refused(&["run", "plan", "r", "--member-seconds", "4294967295"]).await;
    assert!(err.contains("assumed_member_seconds") && err.contains("30 days"), "{err}");
    assert_eq!(f.json(&["strategy", "list"]).await["strategies"].as_array().map(Vec::len), Some(0), "nothing stored");
    assert_eq!(f.json(&["run", "list"]).await["runs"].as_array().map(Vec::len), Some(0), "no run");

    // A far-future availability through the API: refused naming the field, nothing published.
    let mut c = f.client().await;
    let far = v1::RegionAvailability { region: "eu".into(), available_at_unix_ms: i64::MAX };
    let st = c
        .publish_kubernetes(v1::PublishKubernetesRequest { version: "1.30.0".into(), regions: vec![far.clone()] })
        .await
        .expect_err("far future refused");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("regions[0].available_at_unix_ms") && st.message().contains("2200-01-01"), "{st:?}");
    let st = c
        .publish_image(v1::PublishImageRequest {
            family: "Debian-12".into(),
            version: "202312.01.0".into(),
            regions: vec![far],
            ..Default::default()
        })
        .await
        .expect_err("far future refused");
    assert!(st.message().contains("regions[0].available_at_unix_ms"), "{st:?}");
    let err = f
        .refused(&[
            "kubernetes",
            "publish",
            "--version",
            "1.30.0",
            "--regions",
            "eu",
            "--available-at",
            "2300-01-01T00:00:00Z",
        ])
        .await;
    assert!(err.contains("available_at_unix_ms"), "{err}");
    let k = f.json(&["kubernetes", "list"]).await;
    assert_eq!(k["releases"].as_array().map(Vec::len).unwrap_or(0), 0, "nothing published: {k}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec7_hostile_documents_are_refused_fast_with_one_short_line() {
    let f = fleet(&[("n1", "m1", "eu")]).await;
    // 100,000 levels deep, as flow sequences, block sequences and flow mappings: refused before parsing.
    for (name, text) in [
        ("deep-flow.yaml", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))),
        ("deep-dash.yaml", format!("{}x\n", "- ".repeat(100_000))),
        // The shape that kept the old upkeepctl busy past the harness's 30 s.
        ("deep-map.yaml", format!("{}1{}", "{a: ".repeat(100_000), "}".repeat(100_000))),
    ] {
        let path = f.file(name, &text);
        let t0 = Instant::now();
        let err = f.refused(&["strategy", "create", "deep", "-f", &path]).await;
        let took = t0.elapsed();
        eprintln!("{name}: refused in {took:?}");
        assert!(err.contains("nested more than 64 levels"), "{err}");
        assert!(took < Duration::from_secs(5), "{name} took {took:?}");
    }
    let big = f.file("big.yaml", &format!("# {}\n", "x".repeat(2 * 1024 * 1024)));
    let err = f.refused(&["strategy", "create", "big", "-f", &big]).await;
    assert!(err.contains("1 MiB"), "{err}");

    // 20,000 validation errors: one readable line with a count of the rest.
    let members: Vec<String> = (0..20_000).map(|i| format!("\"nope{i}\"")).collect();
    let many = f.file(
        "many.json",
        &format!(r#"{{"stages":[{{"name":"s","groups":[{{"name":"g","members":[{}]}}]}}]}}"#, members.join(",")),
    );
    let err = f.refused(&["strategy", "create", "many", "-f", &many]).await;
    assert!(err.contains("unknown member \"nope0\"") && err.contains("and 19980 more"), "{err}");
    assert!(err.len() < 8_000, "{} bytes", err.len());

    // A 10 KB name is cut in the message.
    let good = f.file("good.json", r#"{"stages":[{"name":"s","groups":[{"name":"g","members":["m1"]}]}]}"#);
    let long = "x".repeat(10_000);
    let err = f.refused(&["strategy", "create", &long, "-f", &good]).await;
    assert!(err.contains("… (10000 characters)") && err.len() < 500, "{} bytes: {err}", err.len());
    let long_member = f.file(
        "long-member.json",
        &format!(r#"{{"stages":[{{"name":"s","groups":[{{"name":"g","members":["{long}"]}}]}}]}}"#),
    );
    let err = f.refused(&["strategy", "create", "s", "-f", &long_member]).await;
    assert!(err.contains("(10000 characters)") && err.len() < 1_000, "{} bytes: {err}", err.len());
    f.stop().await;
}

/// A state written before waits had bounds holds a wait of i64::MAX seconds: planning it, starting the run and
/// recording the member's result must not panic the hub; the run goes on with the wait held to 30 days, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec7_a_stored_wait_out_of_bounds_neither_panics_the_hub_nor_wedges_the_run() {
    let f = fleet(&[("n1", "m1", "eu"), ("n2", "m2", "eu")]).await;
    publish_trusted(&f, &["n1", "n2"], "202312.01.0").await;
    let order = f.file("order.json", &strategy_with_wait("60"));
    f.ok(&["run", "create", "r1", "-f", &order, "--upgrade-type", "NodeImageOnly"]).await;
    let store = f.hub.fleet();
    let store = store.store();
    let rec = store.get_run("r1").expect("store").expect("run");
    let mut state: Value = serde_json::to_value(rec.state().expect("state")).expect("state");
    state["stages"][0]["wait_seconds"] = i64::MAX.into();
    let whole = RunWrite::Replace(vec![(runparts::WHOLE.to_string(), state.to_string())]);
    store.commit_run("r1", rec.version, &rec.status, &whole, &[]).expect("rewrite the stored state");

    let plan = f.json(&["run", "plan", "r1", "--member-seconds", "60"]).await;
    assert_eq!(plan["members"][0]["member"], "m1", "{plan}");
    f.ok(&["run", "start", "r1"]).await;
    let run = wait_for("m1 upgraded and the wait running", WAIT, || async {
        let v = upkeepctl_json(&f.pki, &f.hub.url(), &["run", "show", "r1"]).await.ok()?;
        (v["stages"][0]["after_stage_wait"]["status"] == "Running").then_some(v)
    })
    .await;
    assert_eq!(run_member(&run, "m1")["status"], "Completed", "{run}");
    let msg = run["stages"][0]["after_stage_wait"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("outside 0..=2592000") && msg.contains("2592000s is used"), "{msg}");
    // The hub still serves, and the operator can move the run on.
    f.json(&["node", "list"]).await;
    f.ok(&["run", "skip", "r1", "--after-stage-wait", "canary"]).await;
    let done = wait_for("run completed", WAIT, || async {
        let v = upkeepctl_json(&f.pki, &f.hub.url(), &["run", "show", "r1"]).await.ok()?;
        (v["status"] == "Completed").then_some(v)
    })
    .await;
    assert_eq!(run_member(&done, "m2")["status"], "Completed", "{done}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec7_image_publish_refuses_a_signature_that_does_not_parse() {
    let f = fleet(&[("n1", "m1", "eu")]).await;
    let art = f.work.path().join("img.tar");
    std::fs::write(&art, b"image bytes").expect("write");
    let sig = f.file("garbage.minisig", "untrusted comment: x\nRWQ=\n");
    let art = art.to_string_lossy().into_owned();
    let publish = ["image", "publish", "--family", "Debian-12", "--version", "202312.01.0", "--regions", "eu"];
    let err = f.refused(&[&publish[..], &["--file", &art, "--signature", &sig]].concat()).await;
    assert!(err.contains("signature:") && err.contains("upkeepctl image sign"), "{err}");
    let images = f.json(&["image", "list"]).await;
    assert_eq!(images["images"].as_array().map(Vec::len), Some(0), "nothing published: {images}");
    // A well-formed signature by a key no node trusts is the nodes' to refuse; but these bytes are no image
    // archive: refused as `tar` (the default), naming the file and the way out; accepted as a raw disk image.
    let sig = f.file("nobody.minisig", &untrusted_signature());
    let err = f.refused(&[&publish[..], &["--file", &art, "--signature", &sig]].concat()).await;
    assert!(err.contains("file: not an image archive") && err.contains("--format raw"), "{err}");
    f.ok(&[&publish[..], &["--file", &art, "--signature", &sig, "--format", "raw"]].concat()).await;
    // An archive that says it is another version is refused, naming both.
    let other = f.work.path().join("other.tar");
    upkeep_hub::image_tools::build_test_image(&other, "Debian-12", "202401.01.0", &[]).expect("build");
    let sig = f.file("other.minisig", &untrusted_signature());
    let other = other.to_string_lossy().into_owned();
    let publish = ["image", "publish", "--family", "Debian-12", "--version", "202402.01.0", "--regions", "eu"];
    let err = f.refused(&[&publish[..], &["--file", &other, "--signature", &sig]].concat()).await;
    assert!(err.contains("Debian-12-202401.01.0") && err.contains("Debian-12-202402.01.0"), "{err}");
    let err = f.refused(&[&publish[..], &["--file", &other, "--signature", &sig, "--format", "zip"]].concat()).await;
    assert!(err.contains("format") && err.contains("tar or raw"), "{err}");
    f.stop().await;
}

/// `[images] trusted_keys`: the hub refuses an uploaded image that a key it trusts did not sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec7_image_publish_verifies_against_the_hubs_trusted_keys() {
    let pki = TestPki::new();
    let work = tempfile::tempdir().expect("tempdir");
    let trusted = work.path().join("trusted");
    let other = work.path().join("other");
    upkeep_hub::image_tools::keygen(&trusted).expect("keygen");
    upkeep_hub::image_tools::keygen(&other).expect("keygen");
    let extra = format!(
        "[auto_upgrade]\nenabled = false\n[images]\ntrusted_keys = [{:?}]\n",
        trusted.join("upkeep-image.pub").to_string_lossy()
    );
    let mut hub =
        TestHub::start_with(&pki, &work.path().join("hub"), "127.0.0.1:0".parse().expect("addr"), &extra).await;
    let ctl = |args: Vec<String>| {
        let (pki, url) = (&pki, hub.url());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            upkeepctl(pki, &url, "operator", &args).await
        }
    };
    for (version, key, ok) in [("202312.01.0", &trusted, true), ("202312.02.0", &other, false)] {
        let img = work.path().join(format!("{version}.tar"));
        upkeep_hub::image_tools::build_test_image(&img, "Debian-12", version, &[]).expect("build");
        upkeep_hub::image_tools::sign(&key.join("upkeep-image.key"), &img).expect("sign");
        let args = ["image", "publish", "--family", "Debian-12", "--version", version, "--regions", "eu", "--file"];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(img.to_string_lossy().into_owned());
        let out = ctl(args).await;
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.success(), ok, "{version}: {err}");
        if !ok {
            assert!(err.contains("signature:") && err.contains("unknown key") && err.contains("trusted_keys"), "{err}");
        }
    }
    let list = upkeepctl_json(&pki, &hub.url(), &["image", "list"]).await.expect("list");
    assert_eq!(list["images"].as_array().map(Vec::len), Some(1), "only the trusted one: {list}");
    hub.stop().await;
}
