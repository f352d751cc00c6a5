//! How long the coordinator took to answer each job API call, by method: from the moment
//! the gRPC server hands the call to the service until its answer is ready (a stream's, such
//! as `WatchJob`'s, until it opens). Beside a
//! caller's own timing it tells the coordinator's share of a slow call from the network's
//! and the caller's, and an operator reads the API's latency without instrumenting every
//! pipeline that calls it.
//!
//! Only the `Coordinator` service's calls are timed, under the method's name from the
//! service's descriptor; a path that names no such method (any caller can send one) is
//! counted as `unknown`, so a caller cannot grow the label set. Agents' sessions are
//! streams that last the session; their messages are timed in the state task's queue
//! ([`crate::metrics::REQUEST_WAIT_SECONDS`]).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;
use tonic::codegen::http;

/// Label of calls to a path that names no method of the service.
const UNKNOWN: &str = "unknown";

/// The layer that times the job API's calls ([`Timed`]).
#[derive(Clone, Debug)]
pub struct TimeCalls {
    /// `/<package>.<service>/`: the prefix of the timed calls' paths.
    prefix: Arc<str>,
    methods: Arc<HashSet<String>>,
}

impl TimeCalls {
    /// Times the calls of `service` (its full name, `shoal.v1.Coordinator`) under the
    /// methods the encoded descriptor set `descriptors` gives it.
    pub fn new(descriptors: &[u8], service: &str) -> Self {
        let (package, name) = service.rsplit_once('.').unwrap_or(("", service));
        let set = prost_types::FileDescriptorSet::decode(descriptors).unwrap_or_default();
        let methods = (set.file.iter())
            .filter(|f| f.package() == package)
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == name)
            .flat_map(|s| &s.method)
            .map(|m| m.name().to_owned())
            .collect();
        Self {
            prefix: format!("/{service}/").into(),
            methods: Arc::new(methods),
        }
    }

    /// The label a call to `path` is counted under, or None if it is not timed.
    fn method(&self, path: &str) -> Option<String> {
        let method = path.strip_prefix(&*self.prefix)?;
        Some(if self.methods.contains(method) {
            method.to_owned()
        } else {
            UNKNOWN.to_owned()
        })
    }
}

impl<S> tower::Layer<S> for TimeCalls {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            calls: self.clone(),
        }
    }
}

/// A service whose job API calls are timed into [`crate::metrics::API_CALL_SECONDS`].
#[derive(Clone, Debug)]
pub struct Timed<S> {
    inner: S,
    calls: TimeCalls,
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Boxed<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.calls.method(request.uri().path());
        let start = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            if let Some(method) = method {
                metrics::histogram!(crate::metrics::API_CALL_SECONDS, "method" => method)
                    .record(start.elapsed());
            }
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::TimeCalls;

    #[test]
    fn calls_are_labelled_by_the_services_methods_only() {
        use shoal_proto::pb::v1::coordinator_server::CoordinatorServer;
        type Server = CoordinatorServer<crate::service::Api>;
        let name = <Server as tonic::server::NamedService>::NAME;
        let calls = TimeCalls::new(shoal_proto::pb::FILE_DESCRIPTOR_SET, name);
        let method = |p: &str| calls.method(p);
        assert_eq!(
            method("/shoal.v1.Coordinator/ListAgents").as_deref(),
            Some("ListAgents")
        );
        assert_eq!(
            method("/shoal.v1.Coordinator/Distribute").as_deref(),
            Some("Distribute")
        );
        // Any caller can name a method: it does not become a label.
        assert_eq!(
            method("/shoal.v1.Coordinator/NoSuchCall").as_deref(),
            Some("unknown")
        );
        // Other services are not timed here.
        assert_eq!(method("/shoal.v1.AgentSession/Session"), None);
        assert_eq!(method("/grpc.health.v1.Health/Check"), None);
    }
}
