//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does.
//!
//! - A candidate takes the Lease when it is free, released, or expired. Expiry is judged by
//!   the candidate's own clock: the Lease counts as expired once its holder and renew time
//!   have not changed for `lease_duration` since this candidate first saw them, so clocks of
//!   different machines never have to agree.
//! - The holder renews every `retry_period`. Every write compares the Lease's
//!   resourceVersion, so two candidates can never both think they took it.
//! - A holder that has not renewed for `renew_deadline` (shorter than the lease duration)
//!   stops leading: its loops are told to stop before any other candidate may consider the
//!   Lease expired. [`Leadership::is_leading`] answers from the same clock, so an action
//!   checked against it never overlaps another holder's.
//! - On shutdown the holder releases the Lease (an empty holder), so another takes over at
//!   once instead of after the lease duration.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::api::kinds::Kind;
use crate::client::Client;
use crate::proto::v1 as pb;

/// Timings, with Kubernetes' defaults.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// Who this candidate is (written as the Lease's holderIdentity).
    pub identity: String,
    /// How long a Lease not renewed stays someone else's.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaderConfig {
        LeaderConfig {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a leading term's work gets: whether it still leads, by the deadline clock.
#[derive(Clone)]
pub struct Leadership {
    /// The local instant until which this term may act (last renewal + renew deadline).
    until: watch::Receiver<Option<Instant>>,
}

impl Leadership {
    /// Whether this term may still act now.
    pub fn is_leading(&self) -> bool {
        self.until.borrow().is_some_and(|t| Instant::now() < t)
    }

    /// Resolves when this term has ended (lost, expired or released).
    pub async fn lost(&mut self) {
        loop {
            let deadline = *self.until.borrow_and_update();
            match deadline {
                None => return,
                Some(t) if Instant::now() >= t => return,
                Some(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        changed = self.until.changed() => if changed.is_err() { return },
                    }
                }
            }
        }
    }
}

fn micro_now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// What this candidate last saw of the Lease, and when (by its own clock).
struct Observed {
    holder: String,
    renew_time: String,
    at: Instant,
    /// The lease duration the record states.
    duration: Duration,
}

/// One candidate for one Lease.
pub struct LeaderElector {
    client: Client,
    config: LeaderConfig,
    observed: Option<Observed>,
}

/// The result of one acquire-or-renew attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Held,
    HeldByOther(String),
    Failed(String),
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderConfig) -> LeaderElector {
        LeaderElector { client, config, observed: None }
    }

    /// Competes for the Lease until `stop` turns true. Each time it is acquired, `lead` runs
    /// with the term's [`Leadership`]; the future is dropped when the term ends. On `stop`
    /// a held Lease is released.
    pub async fn run<F, Fut>(mut self, mut stop: watch::Receiver<bool>, mut lead: F)
    where
        F: FnMut(Leadership) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        loop {
            // Acquire. A term counts from the start of the attempt that won: the write
            // committed after it, so everyone else saw the Lease renewed no earlier.
            let renewed = loop {
                if *stop.borrow() {
                    return;
                }
                let started = Instant::now();
                match self.try_acquire_or_renew().await {
                    Attempt::Held => break started,
                    Attempt::HeldByOther(_) => {}
                    Attempt::Failed(e) => tracing::debug!(lease = self.config.name, error = e, "lease not acquired"),
                }
                // Poll every retry period, but be there when the Lease seen expires.
                let mut wake = Instant::now() + jittered(self.config.retry_period);
                if let Some(o) = &self.observed {
                    wake = wake.min((o.at + o.duration).max(Instant::now()) + Duration::from_millis(1));
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            };
            tracing::info!(lease = self.config.name, identity = self.config.identity, "became leader");
            let (until_tx, until_rx) = watch::channel(Some(renewed + self.config.renew_deadline));
            let term = tokio::spawn(lead(Leadership { until: until_rx.clone() }));
            let abort = term.abort_handle();
            // Renew until the deadline passes without a renewal, or until stopped.
            let mut last = renewed;
            let stopped = loop {
                let deadline = last + self.config.renew_deadline;
                tokio::select! {
                    _ = tokio::time::sleep(self.config.retry_period) => {}
                    _ = tokio::time::sleep_until(deadline) => break false,
                    _ = stop.wait_for(|s| *s) => break true,
                }
                if Instant::now() >= deadline {
                    break false;
                }
                // Each attempt must end before the deadline: an answer after it is no use.
                let started = Instant::now();
                let attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await;
                match attempt {
                    Ok(Attempt::Held) => {
                        last = started;
                        until_tx.send_replace(Some(last + self.config.renew_deadline));
                    }
                    Ok(Attempt::HeldByOther(holder)) => {
                        tracing::warn!(lease = self.config.name, holder, "lost the lease to another holder");
                        break false;
                    }
                    Ok(Attempt::Failed(e)) => tracing::debug!(lease = self.config.name, error = e, "renewal failed"),
                    Err(_) => tracing::debug!(lease = self.config.name, "renewal did not finish in time"),
                }
            };
            // The term ends here, before anyone else may take the Lease.
            until_tx.send_replace(None);
            abort.abort();
            let _ = term.await;
            tracing::info!(lease = self.config.name, identity = self.config.identity, stopped, "stopped leading");
            if stopped {
                self.release().await;
                return;
            }
        }
    }

    fn lease_ref(&self) -> (&str, &str) {
        (&self.config.namespace, &self.config.name)
    }

    /// One attempt to take or keep the Lease.
    async fn try_acquire_or_renew(&mut self) -> Attempt {
        let (ns, name) = self.lease_ref();
        let now = micro_now();
        let seconds = self.config.lease_duration.as_secs().max(1) as i32;
        let current = match self.client.get_opt(Kind::Lease, ns, name).await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let Some(obj) = current else {
            let lease = pb::Lease {
                metadata: Some(pb::ObjectMeta {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    ..Default::default()
                }),
                spec: Some(pb::LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: now.clone(),
                    renew_time: now,
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            };
            return match self.client.create(pb::Object { kind: Some(pb::object::Kind::Lease(lease)) }).await {
                Ok(_) => {
                    self.observed = None;
                    Attempt::Held
                }
                Err(e) => Attempt::Failed(e.to_string()),
            };
        };
        let Some(pb::object::Kind::Lease(mut lease)) = obj.kind else {
            return Attempt::Failed("the server answered with another kind".into());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        // Expiry by this candidate's clock: how long the record has not changed.
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
        let changed = self.observed.as_ref().is_none_or(|o| o.holder != holder || o.renew_time != spec.renew_time);
        if changed {
            let (holder, renew_time) = (holder.clone(), spec.renew_time.clone());
            self.observed = Some(Observed { holder, renew_time, at: Instant::now(), duration });
        }
        let expired = self.observed.as_ref().is_some_and(|o| o.at.elapsed() >= duration);
        let mine = holder == self.config.identity;
        if !holder.is_empty() && !mine && !expired {
            return Attempt::HeldByOther(holder);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        lease.spec = Some(pb::LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if mine { spec.acquire_time.clone() } else { now.clone() },
            renew_time: now,
            lease_transitions: Some(transitions),
            ..spec
        });
        // Compared on the resourceVersion just read: a concurrent writer makes this fail.
        match self.client.update(pb::Object { kind: Some(pb::object::Kind::Lease(lease)) }).await {
            Ok(_) => Attempt::Held,
            Err(e) if e.is_conflict() => Attempt::Failed("the Lease changed under us".into()),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    /// Gives the Lease up, if this candidate still holds it.
    async fn release(&mut self) {
        let (ns, name) = self.lease_ref();
        let Ok(Some(obj)) = self.client.get_opt(Kind::Lease, ns, name).await else { return };
        let Some(pb::object::Kind::Lease(mut lease)) = obj.kind else { return };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        lease.spec = Some(pb::LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            renew_time: micro_now(),
            ..spec
        });
        match self.client.update(pb::Object { kind: Some(pb::object::Kind::Lease(lease)) }).await {
            Ok(_) => tracing::info!(lease = self.config.name, "lease released"),
            Err(e) => tracing::warn!(lease = self.config.name, error = %e, "lease not released; it expires by itself"),
        }
    }
}

/// `d` plus up to 20% (client-go's JitterFactor is 1.2 on the retry period).
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(1.0..1.2))
}
