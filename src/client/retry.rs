//! The retry policy: after a failed attempt, may the client send the same call again (to
//! another replica), must it give the caller the failure, or is the outcome unknown?
//!
//! The decision depends on two things only: whether the call is safe to repeat
//! ([`CallKind`]), and what the failure says about the request ([`Delivery`] and the status
//! code). A Keel replica answers UNAVAILABLE only for a request it never acted on (no leader,
//! no quorum, stopping) and RESOURCE_EXHAUSTED with a pushback hint only for a request it
//! refused before reading it, so both may be sent elsewhere even for writes. A write whose
//! request was sent and got no answer, or got UNKNOWN or DEADLINE_EXCEEDED (the store could
//! not tell whether it committed), may have been applied: sending it again could create an
//! object twice or turn this client's own delete into NotFound, so it is handed back as
//! indeterminate and the caller decides.

use tonic::{Code, Status};

use crate::grpc::{delivery, Delivery};

/// How safe a call is to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Reads: any replica may serve them, any number of times.
    Read,
    /// Writes whose repetition ends in the same state and the same answer (apply, promote,
    /// re-sealing secrets, signing a renewal of the same key).
    Idempotent,
    /// Writes that must not run twice blindly (create, update, delete, token creation).
    Write,
}

/// What to do after one failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it again, to the next replica.
    Retry,
    /// The server's answer stands: give it to the caller.
    Answer,
    /// The request may or may not have taken effect: tell the caller so.
    Indeterminate,
}

/// The metadata key a replica sets on a RESOURCE_EXHAUSTED it sends before doing any work
/// (its in-flight limit): how long to wait before trying again, in milliseconds. It is
/// gRPC's standard retry pushback key.
pub const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The pushback a refused request carries, if the replica sent one.
pub fn pushback(status: &Status) -> Option<std::time::Duration> {
    let ms = status.metadata().get(PUSHBACK)?.to_str().ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// The decision for a call of `kind` that failed with `status`.
pub fn decide(kind: CallKind, status: &Status) -> Verdict {
    verdict(kind, delivery(status), status.code(), pushback(status).is_some())
}

/// The policy as a pure table over what the failure says.
pub fn verdict(kind: CallKind, delivered: Delivery, code: Code, pushback: bool) -> Verdict {
    match (delivered, code) {
        // Never left this process: nothing happened anywhere.
        (Delivery::NotSent, _) => Verdict::Retry,
        // Sent, then the connection broke or the client gave up waiting.
        (Delivery::Lost, _) => match kind {
            CallKind::Write => Verdict::Indeterminate,
            CallKind::Read | CallKind::Idempotent => Verdict::Retry,
        },
        // The replica's own word that it did nothing with the request.
        (Delivery::Answered, Code::Unavailable) => Verdict::Retry,
        (Delivery::Answered, Code::ResourceExhausted) if pushback => Verdict::Retry,
        // The replica could not tell whether the write committed.
        (Delivery::Answered, Code::Unknown | Code::DeadlineExceeded | Code::Cancelled) => match kind {
            CallKind::Write => Verdict::Indeterminate,
            CallKind::Read | CallKind::Idempotent => Verdict::Retry,
        },
        (Delivery::Answered, _) => Verdict::Answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CallKind::*;
    use Delivery::*;
    use Verdict::*;

    #[test]
    fn the_policy_table() {
        // (kind, delivery, code, pushback) -> verdict
        let table = [
            // A request that never left: every kind may go elsewhere.
            (Read, NotSent, Code::Unavailable, false, Retry),
            (Idempotent, NotSent, Code::Unavailable, false, Retry),
            (Write, NotSent, Code::Unavailable, false, Retry),
            (Write, NotSent, Code::Unknown, false, Retry),
            // Sent, no answer: only what is safe to repeat is repeated.
            (Read, Lost, Code::Unavailable, false, Retry),
            (Read, Lost, Code::Cancelled, false, Retry),
            (Idempotent, Lost, Code::Unknown, false, Retry),
            (Write, Lost, Code::Unavailable, false, Indeterminate),
            (Write, Lost, Code::Cancelled, false, Indeterminate),
            (Write, Lost, Code::Unknown, false, Indeterminate),
            // UNAVAILABLE from a replica promises the request was not acted on.
            (Read, Answered, Code::Unavailable, false, Retry),
            (Write, Answered, Code::Unavailable, false, Retry),
            // Refused by the in-flight limit before any work: try elsewhere.
            (Write, Answered, Code::ResourceExhausted, true, Retry),
            (Read, Answered, Code::ResourceExhausted, true, Retry),
            // A RESOURCE_EXHAUSTED without pushback is about the request (too large): final.
            (Read, Answered, Code::ResourceExhausted, false, Answer),
            (Write, Answered, Code::ResourceExhausted, false, Answer),
            // The store could not tell: reads and idempotent writes again, writes unknown.
            (Read, Answered, Code::Unknown, false, Retry),
            (Read, Answered, Code::DeadlineExceeded, false, Retry),
            (Idempotent, Answered, Code::DeadlineExceeded, false, Retry),
            (Write, Answered, Code::Unknown, false, Indeterminate),
            (Write, Answered, Code::DeadlineExceeded, false, Indeterminate),
            (Write, Answered, Code::Cancelled, false, Indeterminate),
            // Every other answer is the server's word.
            (Read, Answered, Code::NotFound, false, Answer),
            (Write, Answered, Code::AlreadyExists, false, Answer),
            (Write, Answered, Code::Aborted, false, Answer),
            (Idempotent, Answered, Code::InvalidArgument, false, Answer),
            (Read, Answered, Code::PermissionDenied, false, Answer),
            (Read, Answered, Code::Unauthenticated, false, Answer),
            (Read, Answered, Code::OutOfRange, false, Answer),
            (Write, Answered, Code::FailedPrecondition, false, Answer),
            (Write, Answered, Code::Internal, false, Answer),
        ];
        for (kind, delivered, code, push, want) in table {
            assert_eq!(verdict(kind, delivered, code, push), want, "{kind:?} {delivered:?} {code:?} pushback={push}");
        }
    }

    #[test]
    fn a_pushback_is_read_from_the_status_metadata() {
        let mut s = Status::resource_exhausted("busy");
        assert_eq!(pushback(&s), None);
        assert_eq!(decide(Write, &s), Answer);
        s.metadata_mut().insert(PUSHBACK, "250".parse().unwrap());
        assert_eq!(pushback(&s), Some(std::time::Duration::from_millis(250)));
        assert_eq!(decide(Write, &s), Retry);
        assert_eq!(decide(Write, &Status::unknown("maybe")), Indeterminate);
        assert_eq!(decide(Read, &Status::unknown("maybe")), Retry);
    }

    #[test]
    fn an_attempt_that_timed_out_on_the_client_counts_as_lost() {
        let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
        let s = Status::from_error(Box::new(e));
        assert_eq!(delivery(&s), Delivery::Lost);
        assert_eq!(decide(Write, &s), Indeterminate);
        assert_eq!(decide(Read, &s), Retry);
    }
}
