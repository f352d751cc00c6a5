//! One fetch per URL identity pulled without a digest.

use super::*;

fn ask(s: &mut S, agent: &str, fetched: &str, gave_up: bool) -> pb::ResolveUrlResponse {
    let req = pb::ResolveUrlRequest {
        url: "http://models.example/m.bin".into(),
        etag: "\"v1\"".into(),
        size: 12_288,
        agent_id: agent.into(),
        fetched_digest: fetched.into(),
        gave_up,
    };
    s.ask(|r| Request::ResolveUrl(req, r)).expect("resolve")
}

#[test]
fn the_first_asker_fetches_and_the_others_wait_for_its_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        join(&mut s, id, 10 + i as u16);
    }
    assert_eq!(ask(&mut s, "a", "", false).fetcher, "a");
    assert_eq!(ask(&mut s, "b", "", false).fetcher, "a", "b waits for a");
    let digest = manifest().digest().to_string();
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
