//! A Distribute to more targets than the planner plans in one slice (issue 17: one to
//! 20,000 agents held the state task 1.4 s): the rest is planned a slice per timeout, with
//! other requests handled between slices, and each target gets one order once all are
//! planned.

use super::*;

#[test]
fn a_big_distribute_is_planned_between_other_work_and_ordered_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(Duration::from_secs(30));
    config.assigner.intake_slice = 2;
    let mut s = state_with(dir.path(), config, start());
    let seeder = join(&mut s, "seeder", 1);
    let (session, _seeder_inbox) = open(&mut s, &seeder);
    let m = manifest();
    register(&mut s, session, &m);
    let ids: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
    let mut inboxes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let joined = join(&mut s, id, 10 + i as u16);
        inboxes.push(open(&mut s, &joined).1);
    }
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let job = distribute(&mut s, m.digest(), &names).expect("distribute");

    // Two planned in the Distribute's own step, seven queued; no order out yet, and the
    // state is due again at once.
    assert_eq!(s.assigner.queued_wants(), 7);
    assert!(s.poll_timeout() <= s.now.mono, "the next slice is due now");
    assert!(inboxes.iter_mut().all(|i| orders(i).is_empty()));
    // Requests are handled between slices: the job is there, its targets pending.
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!((state, targets.len()), (pb::JobState::Pending, 9));

    let mut slices = 0;
    while s.assigner.queued_wants() > 0 {
        let now = s.now;
        s.handle_timeout(now);
        slices += 1;
    }
    assert_eq!(slices, 4, "seven queued wants, two per slice");
    s.advance(Duration::from_millis(1));
    let mut tables = std::collections::BTreeSet::new();
    for (id, inbox) in ids.iter().zip(&mut inboxes) {
        let mut fetches = 0;
        let mut updates = 0;
        while let Ok(Ok(msg)) = inbox.try_recv() {
            match msg.msg {
                Some(coordinator_message::Msg::FetchOrder(o)) => {
                    fetches += 1;
                    if let Some(pb::fetch_order::Kind::Peers(p)) = o.kind {
                        let table = p.manifest.expect("manifest").chunk_digests;
                        tables.insert(table.as_ptr() as usize);
                    }
                }
                Some(coordinator_message::Msg::SourceUpdate(_)) => updates += 1,
                _ => {}
            }
        }
        assert_eq!(
            (fetches, updates),
            (1, 0),
            "{id}: one order with its final sources"
        );
    }
    // The manifest's chunk table is made once for the blob and shared by every order
    // (32 KiB per GiB of blob, copied per order before: 1.4 GiB of RSS for a 20,000-agent
    // Distribute of 1 GiB).
    assert_eq!(tables.len(), 1, "every order shares one chunk table");
}
