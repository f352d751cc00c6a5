//! The table `shoal-sim` prints, and the goals judged on it.

use crate::engine::{Outcome, Strategy};
use crate::scenarios::Goal;
use crate::spec::Spec;

/// One scenario's runs, Shoal first, then the baselines.
#[derive(Debug)]
pub struct Report<'a> {
    pub spec: &'a Spec,
    pub runs: Vec<Outcome>,
    /// Wall-clock seconds the scenario took to simulate (all strategies).
    pub wall: f64,
}

impl Report<'_> {
    pub fn get(&self, strategy: Strategy) -> Option<&Outcome> {
        self.runs.iter().find(|o| o.strategy == strategy)
    }
}

pub const HEADER: &str = "| scenario | strategy | hosts | downloads | GB | bound s | makespan s | ×bound | p50 s | p99 s | p99.9 s | p99 ×bound | origin egress ÷ unique |";
pub const RULE: &str = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn secs(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "never".into()
    }
}

/// Table rows for one scenario.
pub fn rows(r: &Report<'_>) -> Vec<String> {
    let spec = r.spec;
    let bound = spec.bound();
    let unique = spec.unique_bytes() as f64;
    let hosts = spec.hosts.iter().filter(|h| !h.wants.is_empty()).count();
    r.runs
        .iter()
        .map(|o| {
            let makespan = o.makespan().unwrap_or(f64::INFINITY);
            let p99 = o.percentile(99.0);
            format!(
                "| {} | {} | {} | {} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {} | {:.2} |",
                spec.name,
                o.strategy.name(),
                hosts,
                spec.downloads(),
                spec.download_bytes() as f64 / 1e9,
                bound,
                secs(makespan),
                if makespan.is_finite() {
                    format!("{:.2}", makespan / bound)
                } else {
                    "—".into()
                },
                secs(o.percentile(50.0)),
                secs(p99),
                secs(o.percentile(99.9)),
                if p99.is_finite() {
                    format!("{:.2}", p99 / bound)
                } else {
                    "—".into()
                },
                o.origin_egress as f64 / unique,
            )
        })
        .collect()
}

/// Each goal with PASS or FAIL and the figure it was judged on.
pub fn judge(r: &Report<'_>, goals: &[Goal]) -> Vec<(bool, String)> {
    let bound = r.spec.bound();
    let Some(shoal) = r.get(Strategy::Shoal) else {
        return Vec::new();
    };
    let makespan = shoal.makespan().unwrap_or(f64::INFINITY);
    let name = &r.spec.name;
    let mut out = Vec::new();
    for g in goals {
        out.push(match *g {
            Goal::Makespan(max) => {
                let ratio = makespan / bound;
                (ratio <= max, format!("{name}: makespan {ratio:.3} × bound ≤ {max}"))
            }
            Goal::Percentile(p, max) => {
                let ratio = shoal.percentile(p) / bound;
                (ratio <= max, format!("{name}: p{p} {ratio:.3} × bound ≤ {max}"))
            }
            Goal::Within(max) => (
                makespan <= max,
                format!("{name}: every download done in {} s ≤ {max} s", secs(makespan)),
            ),
            Goal::OriginEgress(max) => {
                let ratio = shoal.origin_egress as f64 / r.spec.unique_bytes() as f64;
                (
                    ratio <= max,
                    format!("{name}: origin egress {ratio:.3} × unique bytes ≤ {max}"),
                )
            }
            Goal::LiveCompleteNoCorruption => {
                let ok = shoal.all_live_finished()
                    && shoal.stored_corrupt == 0
                    && shoal.violations.is_empty();
                (
                    ok,
                    format!(
                        "{name}: every live host completes ({}), corrupt chunks stored {} (rejected {}), invariant violations {}",
                        shoal.all_live_finished(),
                        shoal.stored_corrupt,
                        shoal.rejected_chunks,
                        shoal.violations.len()
                    ),
                )
            }
            Goal::BeatsMeshP99 => {
                let mesh = r
                    .get(Strategy::RandomMesh)
                    .map_or(f64::INFINITY, |m| m.percentile(99.0));
                let ours = shoal.percentile(99.0);
                (
                    ours < mesh,
                    format!("{name}: p99 {} s < random mesh {} s", secs(ours), secs(mesh)),
                )
            }
        });
    }
    out
}

/// Peak resident memory of this process so far, bytes (Linux `VmHWM`).
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Where hosts' links differ: each host's completion against its own bound (its bytes ÷ its
/// downlink), the worst of all and the worst of the hosts on the fastest links (what the
/// real-network benchmark's `--slow` rows report). `None` when every host has one bound.
pub fn own_bounds(spec: &Spec, o: &Outcome) -> Option<String> {
    let wanting: Vec<usize> = (spec.hosts.iter().enumerate())
        .filter(|(_, h)| !h.wants.is_empty())
        .map(|(i, _)| i)
        .collect();
    let fastest = (wanting.iter())
        .map(|&i| spec.hosts[i].down_bps)
        .fold(0.0, f64::max);
    if wanting.iter().all(|&i| spec.hosts[i].down_bps == fastest) {
        return None;
    }
    let (mut all, mut fast) = (0.0f64, 0.0f64);
    for (&i, done) in wanting.iter().zip(&o.finished) {
        let ratio = done.map_or(f64::INFINITY, |t| t / spec.host_bound(i));
        all = all.max(ratio);
        if spec.hosts[i].down_bps == fastest {
            fast = fast.max(ratio);
        }
    }
    Some(format!(
        "{}: each host against its own bound: worst {all:.2}, the fast hosts' worst {fast:.2}",
        o.strategy.name()
    ))
}
