//! Agents' Joins and session opens are admitted a few at a time (`service::Api::admitted`):
//! many more than that, all at once over the real gRPC server, every one gets in, and the
//! job API answers while they wait.

use shoal_proto::pb::v1::agent_session_client::AgentSessionClient;
use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::health::Watchdog;

/// More than the admission bound (64) by several times.
const AGENTS: usize = 300;

/// Joins over `channel` and opens a session; returns the agent's id and what keeps its
/// session open.
async fn join_and_open(
    channel: tonic::transport::Channel,
    i: usize,
) -> (String, mpsc::Sender<pb::AgentMessage>) {
    let mut client = AgentSessionClient::new(channel);
    let req = crate::state::tests::join_request("", "", 10_000 + i as u16);
    let joined = client.join(req).await.expect("join").into_inner();
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        agent_id: joined.agent_id.clone(),
        session_token: joined.session_token,
        quic_addresses: vec![],
    };
    let first = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(hello)),
    };
    tx.send(first).await.expect("the stream is open");
    let opened = client.session(ReceiverStream::new(rx)).await;
    opened.expect("session opened");
    (joined.agent_id, tx)
}

type Joined = tokio::task::JoinHandle<(String, mpsc::Sender<pb::AgentMessage>)>;

/// Agents `range` joining and opening their sessions, all at once.
fn wave(channel: &tonic::transport::Channel, range: std::ops::Range<usize>) -> Vec<Joined> {
    (range.map(|i| tokio::spawn(join_and_open(channel.clone(), i)))).collect()
}

/// Every agent of a wave, once in; fails if one is not within 30 s.
async fn all_in(wave: Vec<Joined>) -> Vec<(String, mpsc::Sender<pb::AgentMessage>)> {
    let mut sessions = Vec::new();
    for joined in wave {
        let joined = tokio::time::timeout(Duration::from_secs(30), joined)
            .await
            .expect("every agent gets in within 30 s: no turn is lost")
            .expect("task");
        sessions.push(joined);
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_joins_beyond_the_admission_bound_all_get_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(30));
    let started = crate::start(&config).expect("start");
    let (channel, server) = serve_on_loopback(config, started, Watchdog::default()).await;
    let mut api = CoordinatorClient::new(channel.clone());

    let storm = wave(&channel, 0..AGENTS);
    // The job API is not admitted: it answers while the storm waits for its turns.
    let listed = api.list_jobs(pb::ListJobsRequest::default()).await;
    assert!(listed.is_ok(), "{listed:?}");
    let mut sessions = all_in(storm).await;
    let mut ids: Vec<String> = sessions.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), AGENTS, "each agent its own id");

    // Every one is ready, and a second wave (turns given back) gets in too.
    let ready = |api: &mut CoordinatorClient<tonic::transport::Channel>| {
        let mut api = api.clone();
        async move {
            let req = pb::ListAgentsRequest {
                state: pb::AgentState::Ready as i32,
                page_size: 1000,
                ..Default::default()
            };
            let page = api.list_agents(req).await.expect("list").into_inner();
            page.agents.len()
        }
    };
    assert_eq!(ready(&mut api).await, AGENTS);
    // Were a turn not given back, this wave would wait for it forever.
    sessions.extend(all_in(wave(&channel, AGENTS..AGENTS + 100)).await);
    assert_eq!(ready(&mut api).await, AGENTS + 100);
    server.abort();
}
