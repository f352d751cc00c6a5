//! What the origin client refuses to do for a registry (or a URL) that points it elsewhere:
//! follow a redirect to plain http on another host or an internal address, or send the
//! registry's credentials to a plain-http token realm on another host.

#[path = "support/fake_registry.rs"]
mod fake;

use std::sync::atomic::Ordering;

use fake::*;
use shoal_origin::{Digest, MANIFEST_MEDIA_TYPES, OriginError};

/// A redirect to plain http on another host (or an internal address) is refused before
/// any connection to it, unless `redirect_hosts` names that host.
#[tokio::test]
async fn redirect_elsewhere_over_http_is_refused_unless_configured() {
    let h = Harness::start(Mode::Bearer).await;
    let digest: Digest = REDIRECTED_AWAY.parse().unwrap();
    let err = h
        .client()
        .get_blob(&h.host(), REPO, &digest, None)
        .await
        .expect_err("a redirect to http://localhost was followed");
    let text = err.to_string();
    assert!(text.contains("redirect_hosts"), "{text}");
    assert!(
        h.fake.storage_auth.lock().unwrap().is_empty(),
        "the refused storage host was reached"
    );

    let allowed = h.client_configured(
        Some(USER),
        Some(h.password_file.clone()),
        vec!["localhost".into()],
    );
    let body = allowed
        .get_blob(&h.host(), REPO, &digest, None)
        .await
        .unwrap();
    assert_eq!(read_all(body).await.unwrap(), h.fake.layer);
    assert_eq!(
        h.fake.storage_auth.lock().unwrap().clone(),
        vec![(None, None)]
    );
}

/// Credentials go to a token realm only over https or on the registry's own host: a realm
/// on another host over plain http is asked anonymously (and here refuses).
#[tokio::test]
async fn credentials_are_withheld_from_a_plain_http_realm_on_another_host() {
    let h = Harness::start(Mode::ForeignRealm).await;
    let err = h
        .client()
        .get_manifest(&h.host(), REPO, "v1", MANIFEST_MEDIA_TYPES.as_slice())
        .await
        .expect_err("the foreign realm got the credentials");
    let OriginError::Unauthorized(message) = &err else {
        panic!("want Unauthorized, got {err:?}")
    };
    assert!(message.contains("only sent to an https realm"), "{message}");
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 1);
}
