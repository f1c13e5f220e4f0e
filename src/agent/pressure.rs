//! The node's pressure conditions from real readings, as the kubelet reports them, and its
//! allocatable resources: capacity minus `--reserved`.
//!
//! Thresholds are the kubelet's `--eviction-hard` syntax:
//! `memory.available<100Mi,nodefs.available<10%,pid.available<5%` (the defaults here). A
//! signal below its threshold turns its condition True: MemoryPressure, DiskPressure,
//! PIDPressure.

use std::collections::HashMap;
use std::path::Path;

use crate::api::quantity::Quantity;

pub const DEFAULT_EVICTION_HARD: &str = "memory.available<100Mi,nodefs.available<10%,pid.available<5%";

/// A threshold: an amount, or a share of the total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    Bytes(u64),
    Percent(f64),
}

impl Threshold {
    fn crossed(&self, available: u64, total: u64) -> bool {
        match *self {
            Threshold::Bytes(b) => available < b,
            Threshold::Percent(p) => (available as f64) < total as f64 * p / 100.0,
        }
    }
}

/// The thresholds of the three signals (None: not watched).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds {
    pub memory: Option<Threshold>,
    pub nodefs: Option<Threshold>,
    pub pid: Option<Threshold>,
}

impl Thresholds {
    /// Parses `signal<value,...`; names what is wrong.
    pub fn parse(s: &str) -> Result<Thresholds, String> {
        let mut t = Thresholds::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (signal, value) = part
                .split_once('<')
                .ok_or_else(|| format!("{part:?}: expected SIGNAL<VALUE, e.g. memory.available<100Mi"))?;
            let value = value.trim();
            let threshold = match value.strip_suffix('%') {
                Some(p) => {
                    let p: f64 = p.parse().map_err(|_| format!("{part:?}: {value:?} is not a percentage"))?;
                    if !(0.0..=100.0).contains(&p) {
                        return Err(format!("{part:?}: a percentage is between 0% and 100%"));
                    }
                    Threshold::Percent(p)
                }
                None => {
                    let q = Quantity::parse(value).map_err(|e| format!("{part:?}: {e}"))?;
                    Threshold::Bytes((q.milli / 1000).max(0) as u64)
                }
            };
            match signal.trim() {
                "memory.available" => t.memory = Some(threshold),
                "nodefs.available" => t.nodefs = Some(threshold),
                "pid.available" => t.pid = Some(threshold),
                other => {
                    return Err(format!(
                        "{part:?}: unknown signal {other:?} (memory.available, nodefs.available, pid.available)"
                    ))
                }
            }
        }
        Ok(t)
    }
}

/// What the node has left, read now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readings {
    pub memory_available: u64,
    pub memory_total: u64,
    pub nodefs_available: u64,
    pub nodefs_total: u64,
    pub pids_available: u64,
    pub pids_total: u64,
}

fn meminfo(key: &str, text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Memory from /proc/meminfo (MemAvailable), the data directory's filesystem, and process
/// ids (pid_max against the tasks /proc/loadavg counts).
pub fn read(data_dir: &Path) -> Readings {
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mut dir = data_dir.to_path_buf();
    while !dir.exists() && dir.pop() {}
    let (nodefs_available, nodefs_total) = nix::sys::statvfs::statvfs(&dir)
        .map_or((0, 0), |s| (s.blocks_available() * s.fragment_size(), s.blocks() * s.fragment_size()));
    let pid_max: u64 =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(32768);
    let tasks: u64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok())
        .unwrap_or(0);
    Readings {
        memory_available: meminfo("MemAvailable", &mem),
        memory_total: meminfo("MemTotal", &mem),
        nodefs_available,
        nodefs_total,
        pids_available: pid_max.saturating_sub(tasks),
        pids_total: pid_max,
    }
}

/// One condition as the kubelet words it: (type, status, reason, message).
pub type Condition = (&'static str, &'static str, &'static str, &'static str);

/// MemoryPressure, DiskPressure and PIDPressure for these readings.
pub fn conditions(r: &Readings, t: &Thresholds) -> [Condition; 3] {
    let crossed = |th: &Option<Threshold>, a, total| th.as_ref().is_some_and(|th| th.crossed(a, total));
    [
        if crossed(&t.memory, r.memory_available, r.memory_total) {
            ("MemoryPressure", "True", "KubeletHasInsufficientMemory", "kubelet has insufficient memory available")
        } else {
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available")
        },
        if crossed(&t.nodefs, r.nodefs_available, r.nodefs_total) {
            ("DiskPressure", "True", "KubeletHasDiskPressure", "kubelet has disk pressure")
        } else {
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure")
        },
        if crossed(&t.pid, r.pids_available, r.pids_total) {
            ("PIDPressure", "True", "KubeletHasInsufficientPID", "kubelet has insufficient PID available")
        } else {
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available")
        },
    ]
}

/// Parses `--reserved cpu=500m,memory=512Mi,ephemeral-storage=1Gi,pods=10`.
pub fn parse_reserved(s: &str) -> Result<HashMap<String, Quantity>, String> {
    let mut out = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) =
            part.split_once('=').ok_or_else(|| format!("{part:?}: expected RESOURCE=QUANTITY, e.g. memory=512Mi"))?;
        if !["cpu", "memory", "ephemeral-storage", "pods"].contains(&k) {
            return Err(format!("{part:?}: {k:?} cannot be reserved (cpu, memory, ephemeral-storage, pods)"));
        }
        let q = Quantity::parse(v).map_err(|e| format!("{part:?}: {e}"))?;
        if q.milli < 0 {
            return Err(format!("{part:?}: a reservation cannot be negative"));
        }
        out.insert(k.to_string(), q);
    }
    Ok(out)
}

/// Capacity minus reservations, never below zero; cpu in millicores when fractional, memory
/// and storage in bytes.
pub fn allocatable(
    capacity: &HashMap<String, String>,
    reserved: &HashMap<String, Quantity>,
) -> HashMap<String, String> {
    capacity
        .iter()
        .map(|(k, v)| {
            let Some(r) = reserved.get(k) else { return (k.clone(), v.clone()) };
            let Ok(c) = Quantity::parse(v) else { return (k.clone(), v.clone()) };
            let left = (c.milli - r.milli).max(0);
            let text = if left % 1000 == 0 { (left / 1000).to_string() } else { format!("{left}m") };
            (k.clone(), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_as_the_kubelet_writes_them_and_decide_the_conditions() {
        let t = Thresholds::parse(DEFAULT_EVICTION_HARD).unwrap();
        assert_eq!(t.memory, Some(Threshold::Bytes(100 << 20)));
        assert_eq!(t.nodefs, Some(Threshold::Percent(10.0)));
        let calm = Readings {
            memory_available: 1 << 30,
            memory_total: 2 << 30,
            nodefs_available: 50,
            nodefs_total: 100,
            pids_available: 900,
            pids_total: 1000,
        };
        assert!(conditions(&calm, &t).iter().all(|c| c.1 == "False"));
        let tight = Readings { memory_available: 1 << 20, nodefs_available: 5, pids_available: 10, ..calm };
        let c = conditions(&tight, &t);
        assert_eq!(
            c.map(|c| (c.0, c.1)),
            [("MemoryPressure", "True"), ("DiskPressure", "True"), ("PIDPressure", "True")]
        );
        assert_eq!(c[0].2, "KubeletHasInsufficientMemory");
        assert!(Thresholds::parse("memory.free<1Gi").unwrap_err().contains("unknown signal \"memory.free\""));
        assert!(Thresholds::parse("nodefs.available<110%").unwrap_err().contains("between 0% and 100%"));
        assert!(Thresholds::parse("memory.available=1Gi").unwrap_err().contains("SIGNAL<VALUE"));
    }

    #[test]
    fn reservations_come_off_the_capacity() {
        let cap: HashMap<String, String> =
            [("cpu", "2"), ("memory", "2048Ki"), ("pods", "110")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let r = parse_reserved("cpu=500m,memory=1Mi,pods=10").unwrap();
        let a = allocatable(&cap, &r);
        assert_eq!((a["cpu"].as_str(), a["memory"].as_str(), a["pods"].as_str()), ("1500m", "1048576", "100"));
        assert!(parse_reserved("gpu=1").unwrap_err().contains("cannot be reserved"));
        assert!(parse_reserved("memory").unwrap_err().contains("RESOURCE=QUANTITY"));
    }
}
