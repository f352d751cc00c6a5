//! A small mutation fuzzer that runs on the stable toolchain, for `tests/tests/fuzz.rs`.
//!
//! Each target starts from seeds (valid inputs, and every file of its corpus directory
//! `tests/fuzz/<target>/`, where earlier findings are kept as regression cases) and feeds the
//! target mutated inputs (bit flips, byte changes, insertions, deletions, splices of two
//! inputs, truncations, repeated runs) for a bounded time. The target must not panic (and
//! checks its own properties, panicking when one fails). A panic saves the input under
//! `target/fuzz-findings/<target>/` and fails with its path, so it can be added to the
//! corpus once fixed. There is no coverage feedback: what this buys is many malformed inputs
//! near valid ones, every CI run, with a fixed seed printed for replay.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long each target runs: `SHOAL_FUZZ_SECS` (default 4).
pub fn budget() -> Duration {
    let secs = std::env::var("SHOAL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(4.0);
    Duration::from_secs_f64(secs)
}

/// The random seed: `SHOAL_FUZZ_SEED`, else the clock (printed, to replay a failure).
fn seed() -> u64 {
    std::env::var("SHOAL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that often sit on a parser's edges.
const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b',', b'=', b' ', b':', b'/', b'@', b'\n', b'[', b'{',
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(out.len() + 1);
                out.insert(i, rng.next() as u8);
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below((out.len() - i).min(16));
                out.drain(i..i + n);
            }
            4 if !other.is_empty() => {
                // Splice: our head, the other input's tail.
                let i = rng.below(out.len() + 1);
                let j = rng.below(other.len());
                out.truncate(i);
                out.extend_from_slice(&other[j..]);
            }
            5 => out.truncate(rng.below(out.len() + 1)),
            6 if !out.is_empty() => {
                // Repeat a run: long fields, deep nesting.
                let i = rng.below(out.len());
                let n = 1 + rng.below((out.len() - i).min(8));
                let run = out[i..i + n].to_vec();
                for _ in 0..1 + rng.below(64) {
                    out.splice(i..i, run.iter().copied());
                }
            }
            _ => {
                let i = rng.below(out.len() + 1);
                let v = (rng.next() as u32).to_le_bytes();
                out.splice(i..i, v[..1 + rng.below(4)].iter().copied());
            }
        }
    }
    out
}

/// The checked-in corpus of `target`: `tests/fuzz/<target>/*`.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Runs `check` on `seeds`, the corpus, and mutations of them for [`budget`]. Returns the
/// number of inputs tried; fails (with the saved input's path) on the first panic.
pub fn run(target: &str, seeds: &[Vec<u8>], check: impl Fn(&[u8])) -> Result<u64, String> {
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    pool.extend(corpus(target));
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    let seed = seed();
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut tried = 0u64;
    let mut i = 0usize;
    // The seeds and the corpus first, as they are; then mutations.
    loop {
        let input = if i < pool.len() {
            pool[i].clone()
        } else {
            if started.elapsed() >= budget() {
                break;
            }
            let a = &pool[rng.below(pool.len())];
            let b = &pool[rng.below(pool.len())];
            mutate(&mut rng, a, b)
        };
        i += 1;
        tried += 1;
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let path = save(target, &input);
            return Err(format!(
                "fuzz target {target} panicked ({message}) on {} bytes, saved at {} \
                 (SHOAL_FUZZ_SEED={seed}); fix it and copy the file into tests/fuzz/{target}/",
                input.len(),
                path.display()
            ));
        }
        // Keep some mutants as parents, so changes accumulate.
        if i > pool.len() && pool.len() < 4096 && rng.below(64) == 0 {
            pool.push(input);
        }
    }
    Ok(tried)
}

fn save(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-findings")
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    let name = shoal_proto::Digest::of(input).to_string().replace(':', "-");
    let path = dir.join(name);
    let _ = std::fs::write(&path, input);
    path
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_is_found_and_its_input_saved() {
        let err = super::run("self-test", &[b"abc".to_vec()], |data| {
            assert!(!data.contains(&0xff), "found the byte");
        })
        .expect_err("0xff is one mutation away");
        assert!(err.contains("found the byte"), "{err}");
        let saved = err
            .split("saved at ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .expect("a path");
        let input = std::fs::read(saved).expect("the input was saved");
        assert!(input.contains(&0xff));
        let _ = std::fs::remove_file(saved);
    }
}
