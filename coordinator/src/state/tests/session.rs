//! Join, Hello and the coordinator's messages: what each field of them does.

use super::*;

#[test]
fn join_checks_the_token_and_signs_the_agents_certificate_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(8));
    let request = |token: &str, csr_der: Vec<u8>| pb::JoinRequest {
        token: token.into(),
        quic_addresses: vec!["127.0.0.1:7401".into()],
        previous_agent_id: "a".into(),
        csr_der,
        protocol: shoal_proto::SESSION_PROTOCOL,
        ..Default::default()
    };
    let wrong = request("not-the-token", Vec::new());
    let refused = s.ask(|r| Request::Join(wrong, r));
    assert!(
        matches!(refused, Err(ApiError::Unauthenticated(_))),
        "{refused:?}"
    );
    let bad_csr = request(TOKEN, b"not a csr".to_vec());
    let refused = s.ask(|r| Request::Join(bad_csr, r));
    assert!(
        matches!(refused, Err(ApiError::InvalidArgument(_))),
        "{refused:?}"
    );

    let csr = shoal_pki::CertificateRequest::generate().expect("csr");
    let good = request(TOKEN, csr.csr_der().to_vec());
    let joined = s.ask(|r| Request::Join(good, r)).expect("join");
    assert_eq!(joined.agent_id, "a", "a valid previous id is kept");
    assert_eq!(
        joined.heartbeat_interval_ms, 2_000,
        "the configured heartbeat"
    );
    assert!(!joined.certificate_der.is_empty());
    assert_eq!(joined.ca_certificates_der.len(), 1);
}

#[test]
fn a_session_opens_only_with_the_token_of_the_agents_last_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let first = join(&mut s, "a", 2);
    let second = join(&mut s, "a", 2);
    for (agent_id, session_token) in [
        ("a", first.session_token.as_str()),
        ("unknown", second.session_token.as_str()),
    ] {
        let (tx, _rx) = mpsc::channel(1);
        let hello = pb::Hello {
            agent_id: agent_id.into(),
            session_token: session_token.into(),
            quic_addresses: vec![],
        };
        let refused = s.ask(|reply| Request::OpenSession { hello, tx, reply });
        assert!(
            matches!(refused, Err(ApiError::Unauthenticated(_))),
            "{refused:?}"
        );
    }
    let _ = open(&mut s, &second);
}

#[test]
fn peers_are_told_the_addresses_of_a_sources_hello() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let seeder = join(&mut s, "seeder", 1);
    let (tx, _seeder_inbox) = mpsc::channel(64);
    let hello = pb::Hello {
        agent_id: seeder.agent_id.clone(),
        session_token: seeder.session_token.clone(),
        quic_addresses: vec!["127.0.0.1:9001".into()],
    };
    let session = s
        .ask(|reply| Request::OpenSession { hello, tx, reply })
        .expect("session");
    let m = manifest();
    register(&mut s, session, &m);
    let target = join(&mut s, "target", 2);
    let (_, mut inbox) = open(&mut s, &target);
    distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order");
    assert_eq!(
        sources_of(&order)[0].quic_addresses,
        vec!["127.0.0.1:9001".to_string()],
        "the address of the Hello, not of the Join"
    );
}

#[test]
fn an_order_carries_its_jobs_priority_and_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (_, mut inbox) = open(&mut s, &target);
    let req = pb::DistributeRequest {
        blobs: vec![m.digest().to_string()],
        targets: agents(&["target"]),
        priority: pb::Priority::High as i32,
        ..Default::default()
    };
    let job = distribute_req(&mut s, req).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order");
    assert_eq!(order.priority(), pb::Priority::High);
    assert_eq!(order.job_id, job);
}

#[test]
fn cancelling_a_job_cancels_its_orders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (_, mut inbox) = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order");
    let req = pb::CancelJobRequest {
        job_id: job,
        reason: "changed my mind".into(),
    };
    s.ask(|r| Request::CancelJob(req, None, r)).expect("cancel");
    let mut cancelled = Vec::new();
    while let Ok(Ok(msg)) = inbox.try_recv() {
        if let Some(coordinator_message::Msg::Cancel(c)) = msg.msg {
            cancelled.push(c.order_id);
        }
    }
    assert_eq!(cancelled, vec![order.order_id]);
}

#[test]
fn list_agents_shows_what_agents_said_at_join_and_in_their_load_and_what_they_learned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let req = pb::JoinRequest {
        token: TOKEN.into(),
        labels: [("zone".to_string(), "z1".to_string())].into(),
        quic_addresses: vec!["127.0.0.1:7401".into()],
        upload_capacity_bytes_per_sec: 100,
        download_capacity_bytes_per_sec: 200,
        agent_version: "9.9.9".into(),
        previous_agent_id: "a".into(),
        protocol: shoal_proto::SESSION_PROTOCOL,
        ..Default::default()
    };
    let joined = s.ask(|r| Request::Join(req, r)).expect("join");
    let (session, _inbox) = open(&mut s, &joined);
    let load = pb::Load {
        upload_bytes_per_sec: 10,
        download_bytes_per_sec: 20,
        disk_free_bytes: 30,
        ..Default::default()
    };
    say(&mut s, session, Msg::Load(load));
    let list = s
        .ask(|r| Request::ListAgents(pb::ListAgentsRequest::default(), r))
        .expect("list");
    let a = &list.agents[0];
    assert_eq!(a.labels.get("zone").map(String::as_str), Some("z1"));
    assert_eq!(a.quic_addresses, vec!["127.0.0.1:7401".to_string()]);
    assert_eq!(
        (
            a.upload_capacity_bytes_per_sec,
            a.download_capacity_bytes_per_sec
        ),
        (100, 200)
    );
    assert_eq!(
        (
            a.declared_upload_capacity_bytes_per_sec,
            a.declared_download_capacity_bytes_per_sec
        ),
        (100, 200)
    );
    assert_eq!(a.version, "9.9.9");
    assert_eq!(
        (
            a.upload_bytes_per_sec,
            a.download_bytes_per_sec,
            a.disk_free_bytes
        ),
        (10, 20, 30)
    );
    // What the agent learned its links carry replaces what it declared, never above it.
    let learned = pb::Load {
        learned_upload_bytes_per_sec: 50,
        learned_download_bytes_per_sec: 500,
        ..load
    };
    say(&mut s, session, Msg::Load(learned));
    let list = s
        .ask(|r| Request::ListAgents(pb::ListAgentsRequest::default(), r))
        .expect("list");
    let a = &list.agents[0];
    assert_eq!(
        (
            a.upload_capacity_bytes_per_sec,
            a.download_capacity_bytes_per_sec,
            a.declared_upload_capacity_bytes_per_sec
        ),
        (50, 200, 100)
    );
    // The labels select targets.
    let m = manifest();
    register(&mut s, session, &m);
    let mut to_zone = |zone: &str| {
        let req = pb::DistributeRequest {
            blobs: vec![m.digest().to_string()],
            targets: Some(pb::TargetSelector {
                selector: Some(pb::target_selector::Selector::Labels(pb::LabelSelector {
                    match_labels: [("zone".to_string(), zone.to_string())].into(),
                })),
            }),
            ..Default::default()
        };
        s.ask(|r| Request::Distribute(req, Default::default(), r))
            .map(|r| r.target_count)
    };
    assert_eq!(to_zone("z1").expect("distribute"), 1);
    assert!(matches!(to_zone("z2"), Err(ApiError::InvalidArgument(_))));
}

/// An agent id comes back only with the secret issued with it, also after a coordinator
/// restart (the hashes are in redb): a join that claims another agent's id without it
/// gets a new id, so it cannot take over that agent's orders.
#[test]
fn rejoining_under_an_id_needs_its_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let first = join_with_secret(&mut s, "agent-0001", "", 10);
    assert_eq!(first.agent_id, "agent-0001", "a new id is taken as given");
    assert_eq!(first.agent_secret.len(), 64, "and gets a secret");
    let again = join_with_secret(&mut s, "agent-0001", &first.agent_secret, 10);
    assert_eq!(again.agent_id, "agent-0001");
    assert!(
        again.agent_secret.is_empty(),
        "the secret it has stays valid"
    );
    for wrong in ["", "0123", &first.agent_secret[1..]] {
        let thief = join_with_secret(&mut s, "agent-0001", wrong, 11);
        assert_ne!(thief.agent_id, "agent-0001", "claimed with {wrong:?}");
        assert_eq!(
            thief.agent_secret.len(),
            64,
            "the new id gets its own secret"
        );
    }
    // After a restart: the same rules, from the database.
    drop(s);
    let mut s = state(dir.path(), Duration::from_secs(30));
    let back = join_with_secret(&mut s, "agent-0001", &first.agent_secret, 10);
    assert_eq!(back.agent_id, "agent-0001");
    let thief = join_with_secret(&mut s, "agent-0001", "", 11);
    assert_ne!(thief.agent_id, "agent-0001");
}

#[test]
fn a_removed_agent_is_revoked_for_everyone_and_its_id_never_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    let gone = join_with_secret(&mut s, "agent-0001", "", 10);
    let stays = join(&mut s, "agent-0002", 11);
    let (_, mut inbox) = open(&mut s, &stays);
    s.ask(|r| {
        Request::RemoveAgent(
            pb::RemoveAgentRequest {
                agent_id: "agent-0001".into(),
            },
            r,
        )
    })
    .expect("remove");
    // Every connected agent hears of it at once.
    let heard = std::iter::from_fn(|| inbox.try_recv().ok())
        .filter_map(|m| m.ok()?.msg)
        .any(|m| matches!(m, coordinator_message::Msg::RevokedAgents(r) if r.agent_ids == ["agent-0001"] && !r.replace));
    assert!(heard, "the other agent was not told");
    // Its secret no longer brings the id back, before or after a restart.
    let back = join_with_secret(&mut s, "agent-0001", &gone.agent_secret, 10);
    assert_ne!(back.agent_id, "agent-0001");
    drop(inbox);
    drop(s);
    let mut s = state(dir.path(), Duration::from_secs(30));
    let back = join_with_secret(&mut s, "agent-0001", &gone.agent_secret, 10);
    assert_ne!(back.agent_id, "agent-0001");
    // An agent that connects later gets the whole list first.
    let late = join(&mut s, "agent-0003", 12);
    let (_, mut inbox) = open(&mut s, &late);
    match inbox.try_recv().ok().and_then(|m| m.ok()?.msg) {
        Some(coordinator_message::Msg::RevokedAgents(r)) => {
            assert_eq!(r.agent_ids, ["agent-0001"]);
            assert!(r.replace);
        }
        other => panic!("first message {other:?}"),
    }
}

#[test]
fn a_certificate_is_renewed_only_for_a_known_agent_not_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(30));
    join(&mut s, "agent-0001", 10);
    let csr = shoal_pki::CertificateRequest::generate().expect("csr");
    let renew = |s: &mut S, id: &str| {
        let (agent_id, csr_der) = (id.to_string(), csr.csr_der().to_vec());
        s.ask(|reply| Request::RenewCertificate {
            agent_id,
            csr_der,
            reply,
        })
    };
    let renewed = renew(&mut s, "agent-0001").expect("renewed");
    let cert = shoal_pki::CertificateDer::from(renewed.certificate_der);
    assert_eq!(
        shoal_pki::grpc::agent_id_of(&cert).as_deref(),
        Some("agent-0001")
    );
    // Valid for the configured hour from the state's clock (not the machine's).
    let (_, until) = shoal_pki::validity(&cert).expect("validity");
    let left = until.duration_since(s.now.wall).expect("valid");
    assert_eq!(left, Duration::from_secs(3600));
    assert!(matches!(
        renew(&mut s, "agent-0009"),
        Err(ApiError::NotFound(_))
    ));
    s.ask(|r| {
        Request::RemoveAgent(
            pb::RemoveAgentRequest {
                agent_id: "agent-0001".into(),
            },
            r,
        )
    })
    .expect("remove");
    assert!(matches!(
        renew(&mut s, "agent-0001"),
        Err(ApiError::PermissionDenied(_))
    ));
}
