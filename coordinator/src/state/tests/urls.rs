//! One fetch per URL identity pulled without a digest.

use super::*;

fn ask(s: &mut S, agent: &str, fetched: &str, gave_up: bool) -> pb::ResolveUrlResponse {
    try_ask(s, agent, fetched, gave_up).expect("resolve")
}

fn try_ask(
    s: &mut S,
    agent: &str,
    fetched: &str,
    gave_up: bool,
) -> Result<pb::ResolveUrlResponse, ApiError> {
    let req = pb::ResolveUrlRequest {
        url: "http://models.example/m.bin".into(),
        etag: "\"v1\"".into(),
        size: 12_288,
        agent_id: agent.into(),
        fetched_digest: fetched.into(),
        gave_up,
    };
    s.ask(|r| Request::ResolveUrl(req, r))
}

#[test]
fn the_first_asker_fetches_and_the_others_wait_for_its_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let joined: Vec<_> = (["a", "b", "c"].iter().enumerate())
        .map(|(i, id)| join(&mut s, id, 10 + i as u16))
        .collect();
    let (session, _inbox) = open(&mut s, &joined[0]);
    assert_eq!(ask(&mut s, "a", "", false).fetcher, "a");
    assert_eq!(ask(&mut s, "b", "", false).fetcher, "a", "b waits for a");
    let m = manifest();
    assert_eq!(m.size(), 12_288, "the URL's size");
    let digest = m.digest().to_string();
    // Taken only once the fetcher has registered the blob over its session.
    let early = try_ask(&mut s, "a", &digest, false).expect_err("a digest nobody holds");
    assert!(
        matches!(early, ApiError::FailedPrecondition(_)),
        "{early:?}"
    );
    register(&mut s, session, &m);
    assert_eq!(ask(&mut s, "a", &digest, false).digest, digest);
    assert_eq!(ask(&mut s, "b", "", false).digest, digest);
    assert_eq!(ask(&mut s, "c", "", false).digest, digest);
}

#[test]
fn a_fetcher_that_gives_up_hands_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    join(&mut s, "a", 10);
    join(&mut s, "b", 11);
    assert_eq!(ask(&mut s, "a", "", false).fetcher, "a");
    let r = ask(&mut s, "a", "", true);
    assert!(r.digest.is_empty() && r.fetcher.is_empty(), "{r:?}");
    assert_eq!(ask(&mut s, "b", "", false).fetcher, "b");
}

#[test]
fn a_url_without_etag_or_size_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    join(&mut s, "a", 10);
    let req = pb::ResolveUrlRequest {
        url: "http://x/y".into(),
        agent_id: "a".into(),
        ..Default::default()
    };
    let err = s
        .ask(|r| Request::ResolveUrl(req, r))
        .expect_err("no identity");
    assert!(matches!(err, ApiError::InvalidArgument(_)), "{err:?}");
}

/// A caller cannot name the URL's content: a digest is taken only from an agent that holds
/// that blob whole, at the URL's size, registered over its own session.
#[test]
fn a_digest_is_taken_only_from_an_agent_holding_that_blob_at_that_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let a = join(&mut s, "a", 10);
    join(&mut s, "b", 11);
    let (session, _inbox) = open(&mut s, &a);
    assert_eq!(ask(&mut s, "a", "", false).fetcher, "a");
    // A blob `a` holds, but of another size than the URL's.
    let other = Manifest::from_reader(&[9u8; 4096][..], 4096).expect("manifest");
    register(&mut s, session, &other);
    let wrong_size = try_ask(&mut s, "a", &other.digest().to_string(), false);
    assert!(
        matches!(wrong_size, Err(ApiError::FailedPrecondition(_))),
        "{wrong_size:?}"
    );
    // Another caller naming `a`'s blob as `b`, or naming `a` with a blob `a` lacks.
    let m = manifest();
    let not_held = try_ask(&mut s, "a", &m.digest().to_string(), false);
    assert!(
        matches!(not_held, Err(ApiError::FailedPrecondition(_))),
        "{not_held:?}"
    );
    let by_b = try_ask(&mut s, "b", &other.digest().to_string(), false);
    assert!(
        matches!(by_b, Err(ApiError::FailedPrecondition(_))),
        "{by_b:?}"
    );
    // Nothing was learnt: the URL is still `a`'s to fetch.
    let r = ask(&mut s, "b", "", false);
    assert!(r.digest.is_empty() && r.fetcher == "a", "{r:?}");
}
