//! Which blobs to evict to make room: least recently used first, never a pinned one. Pure, so
//! the policy is tested without files.

use shoal_proto::Digest;

/// A blob as eviction sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub digest: Digest,
    pub size: u64,
    /// Logical recency: larger is more recently used.
    pub recency: u64,
    pub pinned: bool,
}

/// Room cannot be made: even with every unpinned blob gone the incoming blob does not fit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Shortfall {
    /// Bytes held by pinned blobs, which eviction may not touch.
    pub pinned: u64,
}

/// The blobs to evict, oldest first, so that `usage - evicted + incoming <= quota`. Evicts
/// nothing when it already fits, and nothing at all (`Err`) when it cannot be made to fit.
pub(crate) fn plan(
    candidates: &[Candidate],
    usage: u64,
    incoming: u64,
    quota: u64,
) -> Result<Vec<Digest>, Shortfall> {
    let fits = |usage: u64| usage.saturating_add(incoming) <= quota;
    if fits(usage) {
        return Ok(Vec::new());
    }
    let mut unpinned: Vec<&Candidate> = candidates.iter().filter(|c| !c.pinned).collect();
    unpinned.sort_by_key(|c| c.recency);
    let mut remaining = usage;
    let mut victims = Vec::new();
    for c in unpinned {
        victims.push(c.digest);
        remaining = remaining.saturating_sub(c.size);
        if fits(remaining) {
            return Ok(victims);
        }
    }
    let pinned = candidates.iter().filter(|c| c.pinned).map(|c| c.size).sum();
    Err(Shortfall { pinned })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, size: u64, recency: u64, pinned: bool) -> Candidate {
        Candidate {
            digest: Digest::from_bytes([n; 32]),
            size,
            recency,
            pinned,
        }
    }

    fn d(n: u8) -> Digest {
        Digest::from_bytes([n; 32])
    }

    #[test]
    fn evicts_least_recent_unpinned_until_it_fits() {
        let blobs = [
            blob(1, 10, 5, false),
            blob(2, 10, 1, true),
            blob(3, 10, 3, false),
            blob(4, 10, 9, false),
        ];
        assert_eq!(plan(&blobs, 40, 5, 45), Ok(vec![]));
        assert_eq!(plan(&blobs, 40, 10, 45), Ok(vec![d(3)]));
        assert_eq!(plan(&blobs, 40, 20, 45), Ok(vec![d(3), d(1)]));
        assert_eq!(plan(&blobs, 40, 35, 45), Ok(vec![d(3), d(1), d(4)]));
    }

    #[test]
    fn refuses_when_pinned_blobs_leave_no_room() {
        let blobs = [
            blob(1, 10, 5, true),
            blob(2, 10, 1, true),
            blob(3, 10, 3, false),
        ];
        assert_eq!(plan(&blobs, 30, 15, 30), Err(Shortfall { pinned: 20 }));
        assert_eq!(plan(&[], 0, 31, 30), Err(Shortfall { pinned: 0 }));
        assert_eq!(plan(&blobs, 30, 10, 30), Ok(vec![d(3)]));
    }
}
