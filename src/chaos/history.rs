//! The vocabulary of a recorded history: what a chaos client asked of one key of the Objects
//! API, what it heard back, and when. The driver builds these from gRPC calls; the checker only
//! reads them. Nothing here judges a history.

use std::fmt;

/// An object's version as a client saw it: the store revision it was written at, and the
/// payload the driver put in it (make payloads unique per key, so a read names its write).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    pub rv: u64,
    pub value: u64,
}

/// One request against a single key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Create the object; fails with AlreadyExists if it is present.
    Create { value: u64 },
    /// Replace the object if its resourceVersion is `expected_rv` (compare-and-set).
    Update { expected_rv: u64, value: u64 },
    /// Delete the object, whatever its version.
    Delete,
    /// Read the object.
    Get,
}

/// The answer the server gave to a request that completed.
///
/// Definite refusals (`AlreadyExists`, `Conflict`, `NotFound`) are answers too: they say what
/// the key held at the moment the request took effect, and the checker holds them to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A create succeeded; the new object has this resourceVersion.
    Created {
        rv: u64,
    },
    /// An update succeeded; the object now has this resourceVersion. Keel answers an update
    /// that changes nothing with the current object, so `rv == expected_rv` is legal then.
    Updated {
        rv: u64,
    },
    Deleted,
    /// What a read saw; `Got(None)` and `NotFound` mean the same for a `Get`.
    Got(Option<Version>),
    /// gRPC ALREADY_EXISTS.
    AlreadyExists,
    /// gRPC ABORTED: the object's resourceVersion was not the expected one.
    Conflict,
    /// gRPC NOT_FOUND.
    NotFound,
}

/// How a request ended, in the Jepsen/Knossos sense.
///
/// Mapping a gRPC result: success, NOT_FOUND, ALREADY_EXISTS and ABORTED are `Ok` answers.
/// UNAVAILABLE is `Fail` only when Keel's server sent it (it promises the write was never
/// proposed); tonic reports a connection that broke mid-request as UNAVAILABLE too, and such a
/// write may have been applied, so a driver that cannot tell the two apart must record
/// `Unknown`. DEADLINE_EXCEEDED, UNKNOWN, CANCELLED and transport errors are `Unknown`. Getting
/// one wrong only weakens the check in one direction: `Unknown` for a request that failed
/// costs search time, `Fail` for one that took effect can report a false violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The server answered; the request took effect (or was refused) at one instant between
    /// its invoke and its completion.
    Ok(Ret),
    /// The request definitely had no effect. The checker ignores it.
    Fail,
    /// The request may or may not have taken effect. It may take effect at any point after its
    /// invoke, even after its recorded completion, or never.
    Unknown,
}

/// One request in a per-key history. Times are monotonic and in any unit (e.g. nanoseconds
/// since the run started); only their order matters. An operation that completed at the very
/// instant another was invoked counts as concurrent with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Operation {
    /// Who issued it; only used to explain a verdict.
    pub client: u64,
    pub op: Op,
    pub outcome: Outcome,
    pub invoke: u64,
    /// When the answer arrived. Read only when `outcome` is `Ok`: an `Unknown` operation stays
    /// open until the end of the history.
    pub complete: u64,
}

impl Operation {
    /// Why this operation cannot appear in a history at all, if it cannot.
    pub(crate) fn malformed(&self) -> Option<String> {
        let Outcome::Ok(ret) = self.outcome else { return None };
        if self.complete < self.invoke {
            return Some(format!("completes at {} before it is invoked at {}", self.complete, self.invoke));
        }
        let fits = match self.op {
            Op::Create { .. } => matches!(ret, Ret::Created { .. } | Ret::AlreadyExists),
            Op::Update { .. } => matches!(ret, Ret::Updated { .. } | Ret::Conflict | Ret::NotFound),
            Op::Delete => matches!(ret, Ret::Deleted | Ret::NotFound),
            Op::Get => matches!(ret, Ret::Got(_) | Ret::NotFound),
        };
        (!fits).then(|| format!("{} cannot answer {}", ret, self.op))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rv {} value {}", self.rv, self.value)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create { value } => write!(f, "Create(value {value})"),
            Op::Update { expected_rv, value } => write!(f, "Update(if rv {expected_rv}, value {value})"),
            Op::Delete => write!(f, "Delete"),
            Op::Get => write!(f, "Get"),
        }
    }
}

impl fmt::Display for Ret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ret::Created { rv } => write!(f, "Created(rv {rv})"),
            Ret::Updated { rv } => write!(f, "Updated(rv {rv})"),
            Ret::Deleted => write!(f, "Deleted"),
            Ret::Got(Some(v)) => write!(f, "Got({v})"),
            Ret::Got(None) => write!(f, "Got(nothing)"),
            Ret::AlreadyExists => write!(f, "AlreadyExists"),
            Ret::Conflict => write!(f, "Conflict"),
            Ret::NotFound => write!(f, "NotFound"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.outcome {
            Outcome::Ok(ret) => {
                write!(f, "client {}: {} -> {} [{}..{}]", self.client, self.op, ret, self.invoke, self.complete)
            }
            Outcome::Fail => {
                write!(f, "client {}: {} -> failed [{}..{}]", self.client, self.op, self.invoke, self.complete)
            }
            Outcome::Unknown => write!(f, "client {}: {} -> unknown [{}..]", self.client, self.op, self.invoke),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(op: Op, ret: Ret, invoke: u64, complete: u64) -> Operation {
        Operation { client: 0, op, outcome: Outcome::Ok(ret), invoke, complete }
    }

    #[test]
    fn an_answer_must_fit_its_request() {
        assert!(ok(Op::Get, Ret::Created { rv: 1 }, 0, 1).malformed().is_some());
        assert!(ok(Op::Delete, Ret::Conflict, 0, 1).malformed().is_some());
        assert!(ok(Op::Create { value: 1 }, Ret::NotFound, 0, 1).malformed().is_some());
        assert!(ok(Op::Get, Ret::NotFound, 0, 1).malformed().is_none());
        assert!(ok(Op::Update { expected_rv: 1, value: 2 }, Ret::NotFound, 0, 1).malformed().is_none());
    }

    #[test]
    fn an_answer_cannot_arrive_before_its_request() {
        let why = ok(Op::Get, Ret::Got(None), 5, 4).malformed().unwrap_or_default();
        assert!(why.contains("before it is invoked"), "{why}");
        let open = Operation { client: 0, op: Op::Delete, outcome: Outcome::Unknown, invoke: 5, complete: 0 };
        assert_eq!(open.malformed(), None, "an unknown operation's completion is not read");
    }
}
