//! The report: a table of what was measured, then the same as one JSON object on the last
//! line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::agent::{Counts, RECEIVED, SENT, Shared};
use super::{ApiTimes, Args, Measured, PHASES};

/// The table's rows and the JSON object's fields, in order.
#[derive(Debug, Default)]
struct Out {
    rows: Vec<(String, String)>,
    json: Vec<(String, String)>,
}

impl Out {
    fn row(&mut self, label: impl Into<String>, value: impl Into<String>) {
        self.rows.push((label.into(), value.into()));
    }

    fn num(&mut self, key: impl Into<String>, v: f64) {
        let v = if v.is_finite() {
            format!("{}", (v * 1e6).round() / 1e6)
        } else {
            "null".into()
        };
        self.json.push((key.into(), v));
    }

    fn text(&mut self, key: impl Into<String>, v: &str) {
        let escaped: String = v
            .chars()
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c if c.is_control() => vec![' '],
                c => vec![c],
            })
            .collect();
        self.json.push((key.into(), format!("\"{escaped}\"")));
    }

    /// p50/p99/max of `secs`, in ms: a row and three fields.
    fn latencies(&mut self, label: &str, key: &str, secs: &[f64]) {
        let mut v = secs.to_vec();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            self.row(label, "none");
            return;
        }
        let (p50, p99, max) = (pct(&v, 50.0), pct(&v, 99.0), v[v.len() - 1]);
        self.row(
            label,
            format!(
                "{:.1} / {:.1} / {:.1} ms (n = {})",
                p50 * 1e3,
                p99 * 1e3,
                max * 1e3,
                v.len()
            ),
        );
        self.num(format!("{key}_p50_ms"), p50 * 1e3);
        self.num(format!("{key}_p99_ms"), p99 * 1e3);
        self.num(format!("{key}_max_ms"), max * 1e3);
    }

    /// A phase's session message waits from the coordinator's histogram: how many, p50 and
    /// p99 (interpolated within their buckets), and the share over 20 ms.
    fn waits(&mut self, phase: &str, buckets: &[(f64, f64)]) {
        let label = format!("session message wait for the state task (every message), {phase}");
        let total = buckets.last().map_or(0.0, |b| b.1);
        if total <= 0.0 {
            self.row(label, "none");
            return;
        }
        let (p50, p99) = (bucket_pct(buckets, 0.50), bucket_pct(buckets, 0.99));
        let within = (buckets.iter().find(|(le, _)| (*le - 0.02).abs() < 1e-9))
            .map_or(f64::NAN, |(_, n)| *n);
        let over = 1.0 - within / total;
        self.row(
            label,
            format!(
                "p50 {:.1} / p99 {:.1} ms, {:.2}% over 20 ms (n = {total})",
                p50 * 1e3,
                p99 * 1e3,
                over * 100.0
            ),
        );
        self.num(format!("session_wait_{phase}_p50_ms"), p50 * 1e3);
        self.num(format!("session_wait_{phase}_p99_ms"), p99 * 1e3);
        self.num(format!("session_wait_{phase}_over_20ms"), over);
    }

    /// A phase's API call times as the caller saw them and as the coordinator counted them
    /// (its histogram, from the call's arrival to its answer): the difference is the
    /// network's and the machine's, not the coordinator's work.
    fn api_times(&mut self, phase: &str, caller: &[f64], coordinator: &[(f64, f64)]) {
        let n = coordinator.last().map_or(0.0, |b| b.1);
        if caller.is_empty() && n <= 0.0 {
            return;
        }
        let mut sorted = caller.to_vec();
        sorted.sort_by(f64::total_cmp);
        let (c50, c99) = if sorted.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (pct(&sorted, 50.0), pct(&sorted, 99.0))
        };
        let (s50, s99) = if n > 0.0 {
            (bucket_pct(coordinator, 0.50), bucket_pct(coordinator, 0.99))
        } else {
            (f64::NAN, f64::NAN)
        };
        self.row(
            format!("API calls, {phase}: caller / coordinator p50, p99"),
            format!(
                "{:.1} / {:.1} ms, {:.1} / {:.1} ms (n = {} / {n})",
                c50 * 1e3,
                s50 * 1e3,
                c99 * 1e3,
                s99 * 1e3,
                caller.len()
            ),
        );
        self.num(format!("api_{phase}_p99_ms"), c99 * 1e3);
        self.num(format!("api_server_{phase}_p99_ms"), s99 * 1e3);
    }
}

/// The `q` quantile of cumulative `buckets`, linear within its bucket as Prometheus'
/// `histogram_quantile` is (the last finite bound if it falls in the infinite one).
fn bucket_pct(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return lower;
            }
            let within = n - below;
            let share = if within > 0.0 {
                (rank - below) / within
            } else {
                1.0
            };
            return lower + (le - lower) * share;
        }
        (lower, below) = (le, n);
    }
    lower
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn report(
    args: &Args,
    m: &Measured,
    counts: &Counts,
    shared: &Shared,
    api: &ApiTimes,
    probes: &BTreeMap<u8, Vec<f64>>,
    logs: &[PathBuf],
) {
    let mut o = Out::default();
    if let Some(f) = &m.failure {
        o.row("RUN FAILED", f);
        o.text("failure", f);
    }
    o.row(
        "agents joined (ListAgents READY)",
        format!("{} of {}", m.agents_joined, args.agents),
    );
    o.num("agents", args.agents as f64);
    o.num("agents_joined", m.agents_joined as f64);
    o.num("channels", args.channels as f64);
    o.num("blob_bytes", args.blob_size as f64);
    o.num("link_mbit", args.link_mbit);
    o.row(
        "all joined and sessions open",
        format!("{:.2} s", m.joins_secs),
    );
    o.num("joins_s", m.joins_secs);
    let joins = |i: usize| {
        shared.join_latencies[i]
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    };
    o.latencies("join latency p50 / p99 / max", "join", &joins(0));
    o.row("blob", &m.blob_digest);
    o.text("blob", &m.blob_digest);
    o.row(
        "Distribute call",
        format!("{:.1} ms", m.distribute_call_secs * 1e3),
    );
    o.num("distribute_call_ms", m.distribute_call_secs * 1e3);
    match m.last_order_secs {
        Some(s) => o.row("Distribute → last FetchOrder received", format!("{s:.2} s")),
        None => o.row("Distribute → last FetchOrder received", "no FetchOrder"),
    }
    o.num("last_fetch_order_s", m.last_order_secs.unwrap_or(f64::NAN));
    o.row(
        "Distribute → job done (GetJob every 200 ms)",
        format!(
            "{:.2} s: {}, {}",
            m.job_done_secs, m.job_state, m.job_targets
        ),
    );
    o.num("job_done_s", m.job_done_secs);
    o.text("job_state", &m.job_state);
    let pretend = args.blob_size as f64 * 8.0 / (args.link_mbit * 1e6) * args.time_scale;
    o.row("one pretend fetch", format!("{pretend:.3} s"));
    let mut all_api = Vec::new();
    for (call, secs) in &api.by_call {
        o.latencies(
            &format!("API {call} p50 / p99 / max"),
            &format!("api_{call}"),
            secs,
        );
        all_api.extend_from_slice(secs);
    }
    o.latencies("API all calls p50 / p99 / max", "api", &all_api);

    let (mut total, mut total_bytes) = (0, 0);
    for (i, kind) in RECEIVED.iter().enumerate() {
        let n = load(&counts.received[i]);
        let bytes = load(&counts.received_bytes[i]);
        total += n;
        total_bytes += bytes;
        if n > 0 {
            o.row(
                format!("coordinator → agents: {kind}"),
                format!("{n} ({:.1} MB)", bytes as f64 / 1e6),
            );
        }
        o.num(format!("recv_{kind}"), n as f64);
        o.num(format!("recv_{kind}_bytes"), bytes as f64);
    }
    o.row(
        "coordinator → agents: all",
        format!("{total} ({:.1} MB)", total_bytes as f64 / 1e6),
    );
    o.num("recv_bytes", total_bytes as f64);
    if let Some((stripes, examined)) = m.planner {
        o.row(
            "  of the source updates, stripes only",
            format!("{stripes}"),
        );
        o.num("stripe_updates", stripes);
        let per = examined / args.agents.max(1) as f64;
        o.row(
            "planner: candidates examined (per agent)",
            format!("{examined} ({per:.1})"),
        );
        o.num("candidates_examined", examined);
    }
    let mut total = 0;
    for (i, kind) in SENT.iter().enumerate() {
        let n = load(&counts.sent[i]);
        total += n;
        o.row(format!("agents → coordinator: {kind}"), n.to_string());
        o.num(format!("sent_{kind}"), n as f64);
    }
    o.row("agents → coordinator: all", total.to_string());
    for (label, key, a) in [
        (
            "FetchOrders for a running order id (resent)",
            "resent_orders",
            &counts.resent_orders,
        ),
        (
            "FetchOrders for a blob already held",
            "orders_for_held",
            &counts.orders_for_held,
        ),
        (
            "FetchOrders not FromPeers",
            "orders_not_from_peers",
            &counts.orders_not_from_peers,
        ),
        (
            "Join attempts failed (retried)",
            "join_errors",
            &counts.join_errors,
        ),
        (
            "sessions failed or broken",
            "session_breaks",
            &counts.session_breaks,
        ),
        (
            "sessions ended UNAUTHENTICATED/NOT_FOUND (rejoined)",
            "rejoins",
            &counts.rejoins,
        ),
        (
            "agents given a new id at a rejoin",
            "new_ids",
            &counts.new_ids,
        ),
    ] {
        o.row(label, load(a).to_string());
        o.num(key, load(a) as f64);
    }
    for why in counts
        .break_reasons
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default()
    {
        o.row("  a session broke", why);
    }
    o.row(
        "holders at the end (agents' own count)",
        shared.holders.load(Ordering::Relaxed).to_string(),
    );

    o.row(
        format!("agent messages per second, steady ({} s)", args.steady_secs),
        format!("{:.0}", m.steady_messages_per_sec),
    );
    o.num("steady_messages_per_s", m.steady_messages_per_sec);
    for (phase, cpu, state, waiting) in &m.cpu_by_phase {
        let share = match *phase {
            "steady" if args.steady_secs > 0 => {
                format!(" ({:.1}% of a core)", cpu / args.steady_secs as f64 * 100.0)
            }
            _ => String::new(),
        };
        o.row(
            format!("coordinator CPU, {phase}"),
            format!(
                "{cpu:.2} s{share}, its state thread {state:.2} s (and {waiting:.2} s waiting for a core)"
            ),
        );
        let key = phase.split(' ').next().unwrap_or("phase");
        o.num(format!("cpu_{key}_s"), *cpu);
        o.num(format!("state_cpu_{key}_s"), *state);
        o.num(format!("state_waiting_{key}_s"), *waiting);
    }
    for (who, u) in &m.usage {
        o.row(
            format!("{who}: CPU total"),
            format!("{:.2} s", u.cpu_seconds),
        );
        o.row(
            format!("{who}: peak RSS (VmHWM)"),
            format!("{:.1} MiB", u.peak_rss_bytes as f64 / 1048576.0),
        );
    }
    if let Some((_, u)) = m.usage.first() {
        o.num("cpu_s", u.cpu_seconds);
        o.num("peak_rss_mib", u.peak_rss_bytes as f64 / 1048576.0);
    }
    if let Some((_, u)) = m.usage.get(1) {
        o.num("restart_cpu_s", u.cpu_seconds);
        o.num("restart_peak_rss_mib", u.peak_rss_bytes as f64 / 1048576.0);
    }
    for (name, waits) in &m.waits {
        let caller = api.by_phase.get(name).map_or(&[][..], |v| v);
        match waits {
            Some(w) => {
                o.waits(name, &w.session);
                o.api_times(name, caller, &w.api);
            }
            None => o.row(
                format!("session message wait for the state task (every message), {name}"),
                "unavailable: a scrape of the coordinator's metrics failed",
            ),
        }
    }
    for (i, name) in PHASES.iter().enumerate() {
        let label = format!("state probe latency (coordinator's gauge), {name}");
        o.latencies(
            &label,
            &format!("probe_{name}"),
            probes.get(&(i as u8)).map_or(&[], |v| v),
        );
    }
    if let Some(r) = &m.restart {
        for (label, key, secs) in [
            ("SIGKILL → answering again", "answering", r.answering_secs),
            ("→ every agent READY", "all_ready", r.all_ready_secs),
            (
                "→ every session reopened (inventory sent)",
                "all_inventoried",
                r.all_inventoried_secs,
            ),
            (
                "→ catalog counts every holder (GetBlob)",
                "all_holders",
                r.all_holders_secs,
            ),
        ] {
            o.row(format!("restart: {label}"), format!("{secs:.2} s"));
            o.num(format!("restart_{key}_s"), secs);
        }
        o.row("restart: the job as it came back", &r.job_on_start);
        o.row("restart: the job once every agent was back", &r.job_at_end);
        o.text("restart_job_on_start", &r.job_on_start);
        o.latencies("rejoin latency p50 / p99 / max", "rejoin", &joins(1));
    }
    o.row(
        "generator (this process) CPU",
        format!("{:.2} s", m.generator_cpu),
    );
    o.num("generator_cpu_s", m.generator_cpu);
    let lines = super::process::log_summary(logs);
    let warns: usize = lines
        .iter()
        .filter(|(l, _)| l.starts_with("WARN"))
        .map(|(_, n)| n)
        .sum();
    let errors: usize = lines
        .iter()
        .filter(|(l, _)| l.starts_with("ERROR"))
        .map(|(_, n)| n)
        .sum();
    o.row(
        "coordinator log: WARN / ERROR lines",
        format!("{warns} / {errors}"),
    );
    o.num("log_warn", warns as f64);
    o.num("log_error", errors as f64);
    for (line, n) in lines.iter().take(8) {
        let mut line = line.clone();
        line.truncate(110);
        o.row(format!("  log ×{n}"), line);
    }

    goals(&mut o);

    println!("\n| measure | value |\n|---|---|");
    for (label, value) in &o.rows {
        println!("| {label} | {} |", value.replace('|', "\\|"));
    }
    let json: Vec<String> = (o.json.iter())
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    println!("{{{}}}", json.join(","));
}

/// Issue 17's goals, each figure as a multiple of its goal (at most 1 meets it).
const GOALS: [(&str, &str, f64); 4] = [
    ("API p99 ÷ 50 ms", "api_p99_ms", 50.0),
    (
        "session messages p99 ÷ 20 ms (their wait for the state task while distributing)",
        "session_wait_distribute_p99_ms",
        20.0,
    ),
    ("peak RSS ÷ 2 GiB", "peak_rss_mib", 2048.0),
    (
        "restart to every agent READY ÷ 30 s",
        "restart_all_ready_s",
        30.0,
    ),
];

/// Rows and fields for [`GOALS`], from the fields already out.
fn goals(o: &mut Out) {
    for (label, key, goal) in GOALS {
        let Some(v) = (o.json.iter())
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse::<f64>().ok())
        else {
            continue;
        };
        let ratio = v / goal;
        o.row(format!("vs goal: {label}"), format!("{ratio:.2}"));
        o.num(format!("goal_{key}"), ratio);
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_pct;
    use crate::process::Waits;

    #[test]
    fn waits_are_read_from_the_histograms_and_interpolated() {
        let name = shoal_coordinator::metrics::REQUEST_WAIT_SECONDS;
        let api = shoal_coordinator::metrics::API_CALL_SECONDS;
        let scrape = |n: [u32; 3]| {
            format!(
                "{name}_bucket{{kind=\"api\",le=\"0.01\"}} 7\n\
                 {name}_bucket{{kind=\"session\",le=\"0.01\"}} {}\n\
                 {name}_bucket{{kind=\"session\",le=\"0.02\"}} {}\n\
                 {name}_bucket{{kind=\"session\",le=\"+Inf\"}} {}\n\
                 {name}_count{{kind=\"session\"}} {}\n\
                 {api}_bucket{{method=\"GetJob\",le=\"0.01\"}} {}\n\
                 {api}_bucket{{method=\"GetJob\",le=\"+Inf\"}} {}\n\
                 {api}_bucket{{method=\"ListAgents\",le=\"0.01\"}} 1\n\
                 {api}_bucket{{method=\"ListAgents\",le=\"+Inf\"}} 3\n",
                n[0], n[1], n[2], n[2], n[0], n[2]
            )
        };
        let before = Waits::read(&scrape([10, 10, 10]));
        assert_eq!(
            before.session,
            vec![(0.01, 10.0), (0.02, 10.0), (f64::INFINITY, 10.0)]
        );
        // The API's calls summed over their methods.
        assert_eq!(before.api, vec![(0.01, 11.0), (f64::INFINITY, 13.0)]);
        let after = Waits::read(&scrape([60, 110, 110]));
        let delta = after.since(&before);
        assert_eq!(
            delta.session,
            vec![(0.01, 50.0), (0.02, 100.0), (f64::INFINITY, 100.0)]
        );
        assert_eq!(delta.api, vec![(0.01, 50.0), (f64::INFINITY, 100.0)]);
        // Half waited at most 10 ms; the 99th is 98% of the way through 10-20 ms.
        let delta = delta.session;
        assert!((bucket_pct(&delta, 0.5) - 0.01).abs() < 1e-9);
        assert!((bucket_pct(&delta, 0.99) - 0.0198).abs() < 1e-9);
        // Beyond the last finite bound: that bound, as Prometheus answers.
        let slow = vec![(0.01, 1.0), (f64::INFINITY, 100.0)];
        assert_eq!(bucket_pct(&slow, 0.99), 0.01);
    }
}
