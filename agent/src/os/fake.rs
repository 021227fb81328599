//! A scripted `NodeOs` for unit tests of the agent's engine only. Never used by the binary.

use super::{NodeOs, OsError, OsFacts};
use std::sync::Mutex;

/// Facts set by the test.
#[derive(Debug, Default)]
pub struct FakeOs {
    facts: Mutex<OsFacts>,
}

impl FakeOs {
    /// With these facts.
    pub fn new(facts: OsFacts) -> FakeOs {
        FakeOs { facts: Mutex::new(facts) }
    }

    /// Replaces the facts.
    pub fn set(&self, facts: OsFacts) {
        *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = facts;
    }
}

impl NodeOs for FakeOs {
    fn facts(&self) -> Result<OsFacts, OsError> {
        Ok(self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}
