//! The faults a chaos run injects into real replica processes, and the seeded schedule that
//! orders them. A seed fixes the order of the faults, their durations, restart delays and
//! which follower or pair they hit; which replica leads at that moment is the cluster's doing.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::harness::ProcCluster;
use crate::netfault::FaultNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// kill -9 the leader; restart it after a delay.
    KillLeader,
    /// kill -9 one follower; restart it after a delay.
    KillFollower,
    /// kill -9 two replicas at once (quorum lost); restart each after its own delay.
    KillTwo,
    /// SIGSTOP the leader for longer than the election timeout, then SIGCONT: a zombie
    /// leader that must not commit or serve a stale read.
    PauseLeader,
    /// Cut every link between the leader and the others.
    IsolateLeader,
    /// Split 1 / 2 with a follower alone: its clients must not read stale data.
    SplitFollower,
    /// The leader's messages reach the followers, their answers and requests do not reach it.
    Asymmetric,
    /// Stop (SIGTERM) and restart each replica in turn, each back before the next goes.
    RollingRestart,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::KillTwo,
        FaultKind::PauseLeader,
        FaultKind::IsolateLeader,
        FaultKind::SplitFollower,
        FaultKind::Asymmetric,
        FaultKind::RollingRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill -9 leader",
            FaultKind::KillFollower => "kill -9 follower",
            FaultKind::KillTwo => "kill -9 two",
            FaultKind::PauseLeader => "SIGSTOP leader",
            FaultKind::IsolateLeader => "isolate leader",
            FaultKind::SplitFollower => "split 1/2 (follower alone)",
            FaultKind::Asymmetric => "leader sends, cannot receive",
            FaultKind::RollingRestart => "rolling restart",
        }
    }
}

/// One fault as the schedule drew it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub kind: FaultKind,
    /// How long the fault lasts (pause, partition) or the first restart delay (kills).
    pub hold: Duration,
    /// The second restart delay (kill two).
    pub hold2: Duration,
    /// Picks the follower, or the pair, the fault hits.
    pub pick: u64,
    /// Quiet time after the cluster recovered, before the next fault.
    pub calm: Duration,
}

/// Rounds of faults: each round is every kind once, in a seeded order.
pub struct Schedule {
    rng: StdRng,
    round: Vec<FaultKind>,
}

impl Schedule {
    pub fn new(seed: u64) -> Schedule {
        Schedule { rng: StdRng::seed_from_u64(seed), round: Vec::new() }
    }

    pub fn next_plan(&mut self) -> Plan {
        if self.round.is_empty() {
            self.round = FaultKind::ALL.to_vec();
            self.round.shuffle(&mut self.rng);
            self.round.reverse();
        }
        let kind = self.round.pop().unwrap_or(FaultKind::KillLeader);
        let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
        // Pauses and partitions outlast the election timeout (at most 200 ms by default)
        // several times over; kills come back after anything from at once to two seconds.
        let hold = match kind {
            FaultKind::PauseLeader | FaultKind::IsolateLeader | FaultKind::SplitFollower | FaultKind::Asymmetric => {
                ms(&mut self.rng, 800, 3000)
            }
            // From 0: a leader back before the others could elect resumes nothing (it must
            // win a new term first), and only an immediate restart tests that.
            _ => ms(&mut self.rng, 0, 2000),
        };
        Plan {
            kind,
            hold,
            hold2: ms(&mut self.rng, 100, 2000),
            pick: self.rng.random_range(0..u64::MAX),
            calm: ms(&mut self.rng, 500, 1500),
        }
    }
}

/// What happened when a fault was injected. Times are the run's clock (ns).
#[derive(Clone, Debug)]
pub struct Injected {
    pub plan: Plan,
    pub at: u64,
    /// When the fault was lifted (restart, SIGCONT, heal). `at` is when it took effect (the
    /// process reaped, the rule in place).
    pub lifted: u64,
    /// Which replicas it hit (1-based ids), e.g. "leader 2".
    pub target: String,
    /// When every replica was back and caught up, if it came to that.
    pub recovered: Option<u64>,
}

/// The replica that leads now (0-based), agreed by every running replica.
pub async fn leader(c: &ProcCluster) -> Result<usize, String> {
    c.wait_leader(Duration::from_secs(20)).await.map_err(|e| e.to_string())
}

fn others(n: usize, of: usize) -> Vec<usize> {
    (0..n).filter(|i| *i != of).collect()
}

/// Injects `plan` and lifts it again. `now` reads the run's clock.
pub async fn inject(
    c: &mut ProcCluster,
    net: &FaultNet,
    plan: Plan,
    now: &(dyn Fn() -> u64 + Sync),
) -> Result<Injected, String> {
    let n = c.nodes.len();
    let lead = leader(c).await?;
    let follower = others(n, lead)[(plan.pick % (n as u64 - 1)) as usize];
    let err = |e: crate::harness::HarnessError| e.to_string();
    let (at, target) = match plan.kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            let victim = if plan.kind == FaultKind::KillLeader { lead } else { follower };
            c.kill(victim).map_err(err)?;
            let at = now();
            tokio::time::sleep(plan.hold).await;
            c.spawn(victim).map_err(err)?;
            let role = if victim == lead { "leader" } else { "follower" };
            (at, format!("{role} {}", victim + 1))
        }
        FaultKind::KillTwo => {
            let first = (plan.pick % n as u64) as usize;
            let second = others(n, first)[((plan.pick >> 8) % (n as u64 - 1)) as usize];
            c.kill(first).map_err(err)?;
            c.kill(second).map_err(err)?;
            let at = now();
            tokio::time::sleep(plan.hold).await;
            c.spawn(first).map_err(err)?;
            tokio::time::sleep(plan.hold2).await;
            c.spawn(second).map_err(err)?;
            let mark = |i: usize| if i == lead { format!("{} (leader)", i + 1) } else { (i + 1).to_string() };
            (at, format!("{} and {}", mark(first), mark(second)))
        }
        FaultKind::PauseLeader => {
            c.pause(lead, true).map_err(err)?;
            let at = now();
            tokio::time::sleep(plan.hold).await;
            c.pause(lead, false).map_err(err)?;
            (at, format!("leader {}", lead + 1))
        }
        FaultKind::IsolateLeader | FaultKind::SplitFollower => {
            let alone = if plan.kind == FaultKind::IsolateLeader { lead } else { follower };
            net.isolate(alone, n);
            let at = now();
            tokio::time::sleep(plan.hold).await;
            net.heal();
            (at, format!("{} alone", alone + 1))
        }
        FaultKind::Asymmetric => {
            for f in others(n, lead) {
                net.drop_replies(lead, f);
                net.cut(f, lead, false);
            }
            let at = now();
            tokio::time::sleep(plan.hold).await;
            net.heal();
            (at, format!("leader {}", lead + 1))
        }
        FaultKind::RollingRestart => {
            let at = now();
            // Followers first, the leader last, as an operator upgrading would.
            let mut order = others(n, lead);
            order.push(lead);
            for i in order {
                c.stop(i, Duration::from_secs(10)).await.map_err(err)?;
                c.spawn(i).map_err(err)?;
                c.wait_caught_up(Duration::from_secs(30)).await.map_err(err)?;
            }
            (at, "all, leader last".to_string())
        }
    };
    Ok(Injected { plan, at, lifted: now(), target, recovered: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_reproduces_the_schedule_and_every_round_has_every_kind() {
        let plans = |seed| {
            let mut s = Schedule::new(seed);
            (0..3 * FaultKind::ALL.len()).map(|_| s.next_plan()).collect::<Vec<_>>()
        };
        assert_eq!(plans(7), plans(7));
        assert_ne!(plans(7), plans(8));
        for round in plans(7).chunks(FaultKind::ALL.len()) {
            let mut kinds: Vec<FaultKind> = round.iter().map(|p| p.kind).collect();
            kinds.sort();
            assert_eq!(kinds, FaultKind::ALL.to_vec());
        }
        for p in plans(7) {
            if p.kind == FaultKind::PauseLeader {
                assert!(p.hold >= Duration::from_millis(800), "a pause outlasts the election timeout: {p:?}");
            }
        }
    }
}
