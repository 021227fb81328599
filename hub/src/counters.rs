//! What the hub counts as it happens, for its Prometheus metrics (`metrics` serves them): steps of node work
//! by step and result with their durations, the lease desk's decisions, run handoffs and run commits. Kept in
//! the `Fleet`, so that the executor, the ledger and the engine reach it; it depends on nothing of theirs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// The step of a node's work (`cordon`, `drain`, `reimage`, ...) and how it ended (`ok`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
    result: String,
}

/// A step of a node's work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepName {
    step: String,
}

/// A lease decision (`granted`, `already_held`, `denied`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
    reason: String,
}

/// A webhook delivery attempt: the webhook's name (operators create a handful) and `ok` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    webhook: String,
    result: String,
}

/// Buckets of a step's duration, seconds: a cordon takes milliseconds, a reimage with its reboot minutes.
const STEP_BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

/// What is counted as it happens (the rest is read when scraped). Cheap to clone: every metric is shared.
#[derive(Clone)]
pub struct Counters {
    node_steps: Family<StepLabels, Counter>,
    step_seconds: Family<StepName, Histogram>,
    lease_decisions: Family<DecisionLabels, Counter>,
    handoff_seconds: Histogram,
    run_commit_seconds: Histogram,
    webhook_deliveries: Family<WebhookLabels, Counter>,
}

/// Buckets of a run's handoff and of a run commit, seconds: milliseconds when all is well (BENCHMARKS.md).
const FAST_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            node_steps: Family::default(),
            step_seconds: Family::new_with_constructor(|| Histogram::new(STEP_BUCKETS)),
            lease_decisions: Family::default(),
            handoff_seconds: Histogram::new(FAST_BUCKETS),
            run_commit_seconds: Histogram::new(FAST_BUCKETS),
            webhook_deliveries: Family::default(),
        }
    }
}

impl Counters {
    /// One step of a node's work ended: `step` is the executor's step name (a bounded set), `ok` its result.
    pub fn node_step(&self, step: &str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "failed" };
        self.node_steps.get_or_create(&StepLabels { step: step.to_string(), result: result.to_string() }).inc();
        self.step_seconds.get_or_create(&StepName { step: step.to_string() }).observe(took.as_secs_f64());
    }

    /// The lease desk decided: `granted`, `already_held` or `denied` with its cause (empty for the others).
    pub fn lease_decision(&self, decision: &'static str, reason: &'static str) {
        self.lease_decisions
            .get_or_create(&DecisionLabels { decision: decision.to_string(), reason: reason.to_string() })
            .inc();
    }

    /// A member's result arrived `took` before the members it let go started.
    pub fn handoff(&self, took: Duration) {
        self.handoff_seconds.observe(took.as_secs_f64());
    }

    /// A run transition's store commit took `took`.
    pub fn run_commit(&self, took: Duration) {
        self.run_commit_seconds.observe(took.as_secs_f64());
    }

    /// A webhook delivery attempt ended (`ok`: the receiver answered 2xx).
    pub fn webhook_delivery(&self, webhook: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.webhook_deliveries
            .get_or_create(&WebhookLabels { webhook: webhook.to_string(), result: result.to_string() })
            .inc();
    }

    /// Adds every counter and histogram to `registry` (shared: the registry reads the live values).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "upkeep_run_handoff_seconds",
            "From a member's result to the start of the members it let go",
            self.handoff_seconds.clone(),
        );
        registry.register(
            "upkeep_store_run_commit_seconds",
            "How long the store took to commit a run transition (its parts and events)",
            self.run_commit_seconds.clone(),
        );
        registry.register(
            "upkeep_node_steps",
            "Steps of node work carried out, by step and result",
            self.node_steps.clone(),
        );
        registry.register(
            "upkeep_node_step_duration_seconds",
            "How long a step of node work took, command sent to result",
            self.step_seconds.clone(),
        );
        registry.register(
            "upkeep_lease_decisions",
            "Lease decisions of the desk, by decision and, for denials, reason (window_closed, budget, run_upgrading, \
             node_out_of_service)",
            self.lease_decisions.clone(),
        );
        registry.register(
            "upkeep_webhook_deliveries",
            "Webhook delivery attempts, by webhook and result (ok: answered 2xx; failed: retried later)",
            self.webhook_deliveries.clone(),
        );
    }
}
