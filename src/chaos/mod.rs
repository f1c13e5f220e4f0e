//! Judging what the chaos suite saw. The suite's driver records, per key, every request it
//! made to the Objects API, when, and how it ended; this module decides whether those
//! histories could have come from a single, atomic copy of each object (linearizability).
//!
//! It is pure: it never talks to a cluster and never reads the clock to build a history, so a
//! verdict depends only on the recorded operations (and on the optional wall-clock budget).
//!
//! What the driver must do for the verdict to mean something:
//! - Record every request to the key, including those that failed or timed out.
//! - Give every write a value unique within its key: reads are matched to writes by value.
//! - Start each key absent, and check each key's history on its own.
//! - Keep a key's history to a few thousand operations when timeouts are common: each
//!   unknown outcome widens the search.
//!
//! ```
//! use keel::chaos::{check, Op, Operation, Outcome, Ret, Version};
//!
//! let created = Outcome::Ok(Ret::Created { rv: 12 });
//! let seen = Outcome::Ok(Ret::Got(Some(Version { rv: 12, value: 7 })));
//! let history = [
//!     Operation { client: 1, op: Op::Create { value: 7 }, outcome: created, invoke: 0, complete: 10 },
//!     // A read that overlaps the create may see it or not; this one did.
//!     Operation { client: 2, op: Op::Get, outcome: seen, invoke: 5, complete: 8 },
//! ];
//! assert!(check(&history).is_linearizable());
//! ```

mod candidates;
pub mod faults;
pub mod history;
pub mod linearize;
pub mod register;
pub mod run;
pub mod verify;
pub mod workload;

#[cfg(test)]
mod linearize_tests;

pub use history::{Op, Operation, Outcome, Ret, Version};
pub use linearize::{check, check_with, Budget, CheckResult, Exhausted, Stranding, Violation};
