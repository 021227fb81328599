//! Update runs (SPEC §5): the model, its validation, its states, and the planner that drives it.
//!
//! # The planning model: state in, plan out
//!
//! The hub persists one [`RunState`] per run: the copied specification and, for every level (the run, each stage,
//! the wait after each stage, each group, each member), a [`LevelState`] with status, start and end time, message
//! and error. Every decision is a pure function of that state, a [`Fleet`] view (members, their node pools,
//! versions, regions and maintenance windows), a [`Catalog`] view (when each image and Kubernetes version becomes
//! available in each region), and `now`:
//!
//! - [`plan`] — what happens next: members that start, members that go Pending (and why) or are skipped by the
//!   system, states rolled up, waits between stages started and finished;
//! - [`start`], [`stop`], [`skip`] — the operator's operations; [`member_finished`] — the result of a member's
//!   upgrade as the executor reports it. Each returns a [`Plan`] or an error that changes nothing.
//!
//! A [`Plan`] holds [`Transition`]s (each an edge of the SPEC's table, see [`can_transition`], or a message
//! update), [`Action`]s for the executor (start upgrading a member to a [`MemberTarget`]), the `Consistent` image
//! selection when the run starts, and `next_wakeup`, the time at which planning again may change something by
//! itself (a window opens, a version lands, a wait ends). The hub's loop is:
//!
//! ```text
//! plan = core::run::plan(&state, &fleet, &catalog, now)    // or start/stop/skip/member_finished
//! state = core::run::apply(&state, &plan)?                 // refuses stale plans and illegal transitions
//! persist(state); publish(plan.transitions)                // persist, then act
//! execute(plan.actions)                                    // the executor makes no choices
//! ... on a result: member_finished(..); on next_wakeup or any change: plan(..) again
//! ```
//!
//! Same inputs, same plan. Planning again right after applying a plan, with the same inputs, yields an empty plan.
//!
//! # Rules, and where the SPEC needed interpreting
//!
//! - Stages run one after another. A stage moves on only when every group is settled (Completed, Skipped, Failed,
//!   Stopped); then its wait runs (Running for the wait's seconds, then Completed); then the next stage starts.
//!   The last stage's wait is honoured too (a soak before the run completes). A stage skipped by the operator or
//!   by the system (all members already at target) skips its wait.
//! - Groups of a stage run in parallel (starts are handed out round robin, one per group per turn); members of a
//!   group one after another, up to the group's `max_concurrency` (default 1); the stage's `max_concurrency` caps
//!   the sum. Percentages resolve against the member count of that group or stage, rounded up, minimum 1.
//! - The next member of a group is chosen by window priority (open now, opens within 4 h, no window, closed),
//!   then declared order. A member whose turn comes is evaluated in this order: no longer in the inventory →
//!   Skipped; `Consistent` selection without a version for one of its pools' families → Skipped; already at
//!   target → Skipped; otherwise every reason it cannot start now (version not yet in its region, window not
//!   open, with the next opening time in RFC 3339 UTC) → Pending, and the next member of the group is tried.
//!   NodeImageOnly runs honour the member's node OS window; Full and ControlPlaneOnly its cluster window.
//! - "At target": Kubernetes at or above the target; a pool at or above the `Latest`/`Consistent` image (never a
//!   downgrade), or exactly at a `Custom` pin (a pin may roll back). A pool with an unknown version is not.
//! - A group with no member running and not all settled is Pending (with members pending, or waiting for a slot
//!   of the stage's cap); a stage likewise; the run takes the status of its current stage (Running while the wait
//!   after a stage runs).
//! - Skipped is reachable from NotStarted and Pending only (see [`can_transition`]). Where the SPEC's table has
//!   no direct edge for a change the SPEC requires — skipping a Failed or Stopped member, or a running wait; a
//!   Pending group whose last member was skipped becoming Completed — the level passes through one intermediate
//!   status (Pending or Running) at the same instant, so that every recorded transition is an edge of the table.
//! - Stop: Pending members and running waits become Stopped (a stopped wait starts again from its full length when
//!   the run is started again); levels with members still upgrading are Stopping
//!   until those finish, then Stopped; the results are recorded.
//! - Failure: the member, its group, stage and run are Failed (errors accumulate in the summary); the other
//!   active groups stop as for an operator stop; members still upgrading finish and are recorded.
//! - Start again (Stopped or Failed, with no member still upgrading): failed and stopped levels go back to
//!   Pending, failed members are retried (a new attempt, `attempts` counts them), the rest resumes in order. The
//!   `Consistent` selection made at the first start is kept.
//! - A member no longer in the inventory when its turn comes is Skipped, saying so.

mod model;
mod plan;
mod state;
mod validate;

#[cfg(test)]
mod tests;

pub use model::{
    DEFAULT_STAGE_NAME, GroupSpec, ImagePin, MAX_GROUPS_PER_STAGE, MAX_MEMBERS_PER_RUN, MAX_STAGES, MAX_WAIT_SECONDS,
    NodeImageSelection, OrderSource, StageSpec, StrategySpec, UpdateRunSpec, UpgradeType, default_strategy,
};
pub use plan::{
    Action, Catalog, Fleet, MemberView, NodePoolView, Plan, PredictedStart, SkipTarget, fail_member_only,
    member_finished, member_finished_and_apply, members_finished_and_apply, plan, plan_and_apply, preview, skip, start,
    stop,
};
pub use state::{
    GroupState, LevelRef, LevelState, MemberState, MemberTarget, RunOpError, RunState, StageState, Status, Transition,
    apply, can_transition, transition_path,
};
pub use validate::{FieldError, describe, order_source, validate_run_spec};
