//! Fencing of the leader's writes (`crate::cluster`): the term a write carries is a property of the thread that
//! makes it.
//!
//! A leader runs its work (run engine, maintenance loop, executor, ledger decisions) on a runtime of its own whose
//! threads all carry the term it was elected with (`set_for_this_thread` at thread start). Every fenced write a
//! store makes from such a thread checks, in its own transaction, that this term is still the database's current
//! one, and is refused with [`super::StoreError::Fenced`] otherwise. Threads without a term (agent and operator
//! sessions, a single hub) write unfenced, as before.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    static TERM: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Set when a store refused a write as fenced; the leadership loop takes it and steps down at once.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// The leader term this thread's writes carry (None: unfenced).
pub fn current() -> Option<u64> {
    TERM.with(|t| t.get())
}

/// Makes this thread's writes carry `term` (a leader runtime's thread-start hook).
pub fn set_for_this_thread(term: Option<u64>) {
    TERM.with(|t| t.set(term));
}

/// Notes that a write was refused because its term is no longer current.
pub fn note_refused() {
    REFUSED.store(true, Ordering::SeqCst);
}

/// Whether a write was refused since the last call (and forgets it).
pub fn take_refused() -> bool {
    REFUSED.swap(false, Ordering::SeqCst)
}
