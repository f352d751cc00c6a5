//! Both halves together: a deterministic mini swarm in plain loops with virtual time.
//! One seed and 20 targets; every host uploads one chunk per tick; requests are served
//! FIFO per source; targets report progress to the assigner, which turns them into
//! sources for each other.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use shoal_proto::Digest;

use crate::{
    Assigner, AssignerConfig, BlobId, ChunkIndex, ChunkPicker, ChunkSet, Command, Event, HostId,
    PickerConfig, RackId, Time, ZoneId,
};

const CHUNKS: u32 = 300;
const CHUNK_BYTES: u64 = 1 << 20;
const TARGETS: u32 = 20;
const TICK: Duration = Duration::from_millis(1);

struct Agent {
    store: ChunkSet,
    download: Option<ChunkPicker>,
    /// Requests waiting at this host, as a source: (requester, chunk).
    queue: VecDeque<(HostId, ChunkIndex)>,
    uploaded: u64,
    reported: u32,
}

struct Outcome {
    finish_tick: Vec<u64>,
    seed_uploads: u64,
    total_uploads: u64,
}

fn run(seed: u64) -> Outcome {
    let blob = BlobId(Digest::from_bytes([7; 32]));
    let mut assigner = Assigner::new(AssignerConfig::default(), seed);
    let mut agents: BTreeMap<HostId, Agent> = BTreeMap::new();
    let mut now = Time::ZERO;
    let mut finish_tick = vec![0; TARGETS as usize + 1];
    assigner.handle(
        now,
        Event::BlobKnown {
            blob,
            size: CHUNKS as u64 * CHUNK_BYTES,
            chunk_count: CHUNKS,
        },
    );
    for id in 0..=TARGETS {
        let host = HostId(id);
        assigner.handle(
            now,
            Event::HostUp {
                host,
                zone: ZoneId(id % 2),
                rack: RackId(id % 4),
                upload_bps: 8_000_000_000,
                download_bps: 8_000_000_000,
            },
        );
        let store = if id == 0 {
            ChunkSet::full(CHUNKS)
        } else {
            ChunkSet::empty(CHUNKS)
        };
        agents.insert(
            host,
            Agent {
                store,
                download: None,
                queue: VecDeque::new(),
                uploaded: 0,
                reported: 0,
            },
        );
    }
    assigner.handle(
        now,
        Event::Holds {
            host: HostId(0),
            blob,
            chunks: CHUNKS,
            complete: true,
        },
    );
    for id in 1..=TARGETS {
        assigner.handle(
            now,
            Event::Want {
                blob,
                host: HostId(id),
                priority: 0,
            },
        );
    }

    for tick in 1..20_000u64 {
        now += TICK;
        assigner.check_invariants().unwrap();
        // 1. Orders from the coordinator.
        while let Some(command) = assigner.poll_command() {
            apply(&mut agents, command, seed);
        }
        // 2. Every download fills each source's window.
        let ids: Vec<HostId> = agents.keys().copied().collect();
        for &id in &ids {
            let Some(picker) = agents.get_mut(&id).unwrap().download.as_mut() else {
                continue;
            };
            let mut requests = Vec::new();
            for source in picker.sources().collect::<Vec<_>>() {
                while let Some(c) = picker.next_request(now, source) {
                    requests.push((source, c));
                }
            }
            for (source, c) in requests {
                agents.get_mut(&source).unwrap().queue.push_back((id, c));
            }
        }
        // 3. Every host serves one request per tick.
        for &source in &ids {
            let Some((to, c)) = agents.get_mut(&source).unwrap().queue.pop_front() else {
                continue;
            };
            agents.get_mut(&source).unwrap().uploaded += 1;
            let target = agents.get_mut(&to).unwrap();
            let Some(picker) = target.download.as_mut() else {
                continue;
            };
            let cancelled = picker.on_chunk_done(now, source, c, CHUNK_BYTES);
            target.store.insert(c);
            for other in cancelled {
                agents
                    .get_mut(&other)
                    .unwrap()
                    .queue
                    .retain(|&(r, i)| !(r == to && i == c));
            }
            for (_, a) in agents.iter_mut() {
                if let Some(p) = a.download.as_mut() {
                    p.source_have(to, [c]);
                }
            }
        }
        // 4. Progress reports, batched every 5 ticks; completions at once.
        for &id in &ids {
            let a = agents.get_mut(&id).unwrap();
            let Some(picker) = a.download.as_ref() else {
                continue;
            };
            if picker.is_complete() {
                a.download = None;
                finish_tick[id.0 as usize] = tick;
                assigner.handle(now, Event::Done { host: id, blob });
            } else if tick % 5 == 0 && a.store.count() > a.reported {
                a.reported = a.store.count();
                assigner.handle(
                    now,
                    Event::Holds {
                        host: id,
                        blob,
                        chunks: a.reported,
                        complete: false,
                    },
                );
            }
            if tick % 1_000 == 0 {
                assigner.handle(now, Event::Heartbeat { host: id });
            }
        }
        if finish_tick[1..].iter().all(|&t| t > 0) {
            break;
        }
    }
    let seed_uploads = agents[&HostId(0)].uploaded;
    let total_uploads = agents.values().map(|a| a.uploaded).sum();
    Outcome {
        finish_tick,
        seed_uploads,
        total_uploads,
    }
}

fn apply(agents: &mut BTreeMap<HostId, Agent>, command: Command, seed: u64) {
    let host = command.host();
    let (sources, fresh) = match command {
        Command::Fetch { sources, .. } => (sources, true),
        Command::UpdateSources { sources, .. } => (sources, false),
        Command::Cancel { .. } => {
            agents.get_mut(&host).unwrap().download = None;
            return;
        }
    };
    let stores: BTreeMap<HostId, ChunkSet> = sources
        .iter()
        .map(|s| (*s, agents[s].store.clone()))
        .collect();
    let agent = agents.get_mut(&host).unwrap();
    if fresh {
        let cfg = PickerConfig {
            max_window: 8,
            ..PickerConfig::default()
        };
        agent.download = Some(ChunkPicker::new(
            agent.store.clone(),
            seed ^ u64::from(host.0),
            cfg,
        ));
    }
    // An update may cross the download finishing: the agent ignores it, as agents do.
    let Some(picker) = agent.download.as_mut() else {
        return;
    };
    let old: Vec<HostId> = picker.sources().filter(|s| !sources.contains(s)).collect();
    let mut abandoned = Vec::new();
    for s in old {
        for c in picker.remove_source(s) {
            abandoned.push((s, c));
        }
    }
    for s in &sources {
        if picker.sources().all(|x| x != *s) {
            picker.add_source(*s, stores[s].clone());
        }
    }
    for (s, c) in abandoned {
        agents
            .get_mut(&s)
            .unwrap()
            .queue
            .retain(|&(r, i)| !(r == host && i == c));
    }
}

#[test]
fn mini_swarm_finishes_and_spares_the_seed() {
    let out = run(42);
    let last = *out.finish_tick.iter().max().unwrap();
    assert!(
        out.finish_tick[1..].iter().all(|&t| t > 0),
        "all targets finish: {:?}",
        out.finish_tick
    );
    // 20 copies through 21 uploaders at one chunk per tick: the bound is ~20·300/21 ≈ 286
    // ticks; a seed-only schedule would take 6,000.
    assert!(last < 700, "finished at tick {last}");
    let copies = out.seed_uploads as f64 / f64::from(CHUNKS);
    assert!(copies < 3.0, "the seed uploaded {copies:.2} copies");
    assert!(out.total_uploads >= u64::from(TARGETS * CHUNKS));
    // Deterministic: same seed, same run.
    let again = run(42);
    assert_eq!(
        (again.finish_tick, again.seed_uploads),
        (out.finish_tick, out.seed_uploads)
    );
}

/// Scale smoke test: 10,000 hosts in 50 zones and 1,000 racks, one seed per zone, everyone
/// wants the blob, reports progress and finishes. No clock here: time it from outside with
/// `cargo test --release -p shoal-planner scales` (about 1.5 µs per event when written).
#[test]
fn assigner_scales_to_ten_thousand_hosts() {
    let blob = BlobId(Digest::from_bytes([9; 32]));
    let mut a = Assigner::new(AssignerConfig::default(), 1);
    let mut now = Time::ZERO;
    let n = 10_000u32;
    for id in 0..n {
        a.handle(
            now,
            Event::HostUp {
                host: HostId(id),
                zone: ZoneId(id % 50),
                rack: RackId(id % 1_000),
                upload_bps: 5_000_000_000,
                download_bps: 5_000_000_000,
            },
        );
    }
    for z in 0..50 {
        a.handle(
            now,
            Event::Holds {
                host: HostId(z),
                blob,
                chunks: 100,
                complete: true,
            },
        );
    }
    for id in 50..n {
        a.handle(
            now,
            Event::Want {
                blob,
                host: HostId(id),
                priority: 0,
            },
        );
    }
    let mut events = 0u64;
    for round in 1..=10u32 {
        now += Duration::from_millis(10);
        for id in 50..n {
            let event = if round == 10 {
                Event::Done {
                    host: HostId(id),
                    blob,
                }
            } else {
                Event::Holds {
                    host: HostId(id),
                    blob,
                    chunks: round,
                    complete: false,
                }
            };
            a.handle(now, event);
            events += 1;
        }
        while a.poll_command().is_some() {}
    }
    assert_eq!(events, 10 * u64::from(n - 50));
    a.check_invariants().unwrap();
    assert_eq!(a.stats().completions, u64::from(n - 50));
}
