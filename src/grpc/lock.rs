//! `latchkey.v1.LockService`: validation of lock requests and the Hold stream protocol.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::{
    deadline::{ANSWER_MARGIN, grpc_timeout},
    duration, pb,
    status::FieldExt,
    to_proto,
};
use crate::{
    config::LockConfig,
    lock::{
        AcquireRequest, Acquired, Grant, HoldEnd, Lease, LockEngine, LockError, LockName, Lost,
        NotOwner, Reentry, Released, RequestId, Token, WaitTimeout,
    },
    telemetry,
};

/// The LockService implementation; cheap to clone.
#[derive(Clone)]
pub struct LockApi {
    engine: Arc<LockEngine>,
    limits: Arc<LockConfig>,
    /// One permit per open Hold stream (max_hold_streams).
    hold_streams: Arc<Semaphore>,
}

impl LockApi {
    pub fn new(engine: Arc<LockEngine>, limits: LockConfig) -> Self {
        let hold_streams = Arc::new(Semaphore::new(limits.max_hold_streams as usize));
        Self {
            engine,
            limits: Arc::new(limits),
            hold_streams,
        }
    }

    pub fn into_service(self) -> pb::lock_service_server::LockServiceServer<Self> {
        pb::lock_service_server::LockServiceServer::new(self)
    }

    fn name(&self, raw: String) -> Result<LockName, Status> {
        Ok(LockName::parse(raw, &self.limits).field("name")?)
    }

    fn token(&self, raw: &str) -> Result<Token, Status> {
        Ok(Token::parse(raw).field("token")?)
    }

    fn request_id(&self, raw: &str) -> Result<Option<RequestId>, Status> {
        Ok(RequestId::parse(raw).field("request_id")?)
    }

    fn lease(&self, raw: Option<prost_types::Duration>) -> Result<Lease, Status> {
        Ok(Lease::parse(duration(raw, "lease")?, &self.limits).field("lease")?)
    }

    fn acquire_request(&self, m: pb::AcquireRequest) -> Result<AcquireRequest, Status> {
        let name = self.name(m.name)?;
        let lease = self.lease(m.lease)?;
        let wait = WaitTimeout::parse(duration(m.wait_timeout, "wait_timeout")?, &self.limits)
            .field("wait_timeout")?;
        let token = if m.token.is_empty() {
            None
        } else {
            Some(self.token(&m.token)?)
        };
        let request_id = self.request_id(&m.request_id)?;
        let reenter = match token {
            Some(token) => Some(Reentry { token, request_id }),
            // A fresh Acquire gets a fresh token each time, so its retry is a new Acquire
            // anyway; taking the id would suggest otherwise.
            None if request_id.is_some() => {
                return Err(Status::invalid_argument(
                    "request_id: only a re-entry (with token) takes one; a retried fresh \
                     Acquire is a new Acquire, and a grant whose answer was lost is released by \
                     the server",
                ));
            }
            None => None,
        };
        Ok(AcquireRequest {
            name,
            lease,
            wait,
            reenter,
            fair: m.fair,
        })
    }
}

/// When a wait must end: the request's wait timeout, cut short by the caller's gRPC deadline
/// (minus a margin so the answer arrives before the caller gives up).
pub(super) fn wait_deadline(wait: WaitTimeout, grpc_timeout: Option<Duration>) -> Instant {
    let mut budget = wait.get();
    if let Some(timeout) = grpc_timeout {
        budget = budget.min(timeout.saturating_sub(ANSWER_MARGIN));
    }
    Instant::now() + budget
}

fn acquired_response(acquired: Acquired) -> pb::AcquireResponse {
    match acquired {
        Acquired::Granted(grant) => pb::AcquireResponse {
            acquired: true,
            token: grant.token.to_string(),
            fence: grant.fence,
            lease: Some(to_proto(grant.lease)),
            hold_count: grant.holds,
            holder_ttl: None,
            queued_at: grant.queued_at,
        },
        Acquired::TimedOut { holder_ttl } => pb::AcquireResponse {
            acquired: false,
            holder_ttl: Some(to_proto(holder_ttl)),
            ..Default::default()
        },
    }
}

/// The `outcome` label of a Release RPC's answer (`telemetry::RELEASES`).
fn release_outcome(released: &Result<Released, LockError>) -> &'static str {
    match released {
        Ok(Released::Free) => "freed",
        Ok(Released::StillHeld(_)) => "held",
        Err(LockError::NotOwner(NotOwner::NotHeld)) => "not_held",
        Err(LockError::NotOwner(NotOwner::OtherOwner)) => "other_owner",
        Err(LockError::NotOwner(NotOwner::Expired)) => "expired",
        Err(error) => error.outcome(),
    }
}

fn release_response(released: Released) -> pb::ReleaseResponse {
    match released {
        Released::Free => pb::ReleaseResponse {
            released: true,
            hold_count: 0,
        },
        Released::StillHeld(holds) => pb::ReleaseResponse {
            released: false,
            hold_count: holds,
        },
    }
}

fn hold_event(event: pb::hold_response::Event) -> Result<pb::HoldResponse, Status> {
    Ok(pb::HoldResponse { event: Some(event) })
}

/// Why the client side of a Hold stream ended the hold.
enum Stop {
    /// `release` message.
    Release,
    /// The client closed its sending side.
    ClientClosed,
    /// The client disconnected or cancelled the call.
    ClientGone,
    /// The client broke the protocol; the stream ends with this status.
    Protocol(Status),
}

impl LockApi {
    /// Runs one Hold stream: acquire, renew while open, release when the client is done.
    async fn run_hold(
        self,
        mut inbound: Streaming<pb::HoldRequest>,
        out: mpsc::Sender<Result<pb::HoldResponse, Status>>,
        grpc_timeout: Option<Duration>,
    ) {
        use pb::{hold_request::Action, hold_response::Event};

        let first = match inbound.message().await {
            Ok(Some(first)) => first,
            Ok(None) | Err(_) => return,
        };
        let req = match first.action {
            Some(Action::Acquire(acquire)) => self.acquire_request(acquire),
            _ => Err(Status::invalid_argument(
                "action: the first message of a Hold stream must be `acquire`",
            )),
        };
        let req = match req {
            Ok(req) => req,
            Err(status) => {
                let _ = out.send(Err(status)).await;
                return;
            }
        };

        let deadline = wait_deadline(req.wait, grpc_timeout);
        let grant = match self.engine.acquire(&req, deadline, out.closed()).await {
            Ok(Acquired::Granted(grant)) => grant,
            Ok(timed_out) => {
                let _ = out
                    .send(hold_event(Event::Acquired(acquired_response(timed_out))))
                    .await;
                return;
            }
            Err(error) => {
                let _ = out.send(Err(error.into())).await;
                return;
            }
        };
        if out
            .send(hold_event(Event::Acquired(acquired_response(
                Acquired::Granted(grant),
            ))))
            .await
            .is_err()
        {
            self.give_back(&req.name, grant).await;
            return;
        }

        let stop = async {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(pb::HoldRequest { action: Some(Action::Release(_)) })) => Stop::Release,
                    Ok(Some(_)) => Stop::Protocol(Status::invalid_argument(
                        "action: only `release` may follow the granted `acquire`",
                    )),
                    Ok(None) => Stop::ClientClosed,
                    Err(_) => Stop::ClientGone,
                },
                () = out.closed() => Stop::ClientGone,
            }
        };
        let renewed = |lease: Duration| {
            // A client that does not read its stream misses renewal notices, nothing more.
            let _ = out.try_send(hold_event(Event::Renewed(pb::HoldRenewed {
                lease: Some(to_proto(lease)),
            })));
        };
        let last = match self
            .engine
            .hold(&req.name, &grant, req.lease, stop, renewed)
            .await
        {
            HoldEnd::Stopped(Stop::Release | Stop::ClientClosed, Ok(released)) => {
                hold_event(Event::Released(release_response(released)))
            }
            HoldEnd::Stopped(Stop::Release | Stop::ClientClosed, Err(error)) => Err(error.into()),
            HoldEnd::Stopped(Stop::Protocol(status), _) => Err(status),
            HoldEnd::Stopped(Stop::ClientGone, result) => {
                debug!(lock = %req.name, ?result, "hold client went away; released");
                return;
            }
            HoldEnd::Lost(lost) => {
                let (reason, detail) = match lost {
                    Lost::NotHeld(NotOwner::Expired) => (
                        pb::LostReason::NotHeld,
                        "the lease ended before it could be renewed",
                    ),
                    Lost::NotHeld(_) => (
                        pb::LostReason::NotHeld,
                        "the lock is no longer held by this stream (force-released, or Redis lost its data)",
                    ),
                    Lost::Expired => (
                        pb::LostReason::Expired,
                        "renewals failed (Redis unreachable) until the lease ran out",
                    ),
                    Lost::ShuttingDown => (
                        pb::LostReason::ServerShutdown,
                        "the server is shutting down and released the lock",
                    ),
                };
                hold_event(Event::Lost(pb::HoldLost {
                    reason: reason.into(),
                    detail: detail.to_owned(),
                }))
            }
        };
        let _ = out.send(last).await;
    }

    /// Releases a grant whose caller went away before it learned of it.
    async fn give_back(&self, name: &LockName, grant: Grant) {
        if let Err(error) = self.engine.release(name, grant.token, None).await {
            debug!(lock = %name, %error, "could not give back an unclaimed grant; it frees at lease end");
        }
    }
}

#[tonic::async_trait]
impl pb::lock_service_server::LockService for LockApi {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let req = self.acquire_request(request.into_inner())?;
        let deadline = wait_deadline(req.wait, timeout);

        // The wait runs in its own task: if the caller cancels, tonic drops this handler, but
        // an acquire script already in flight still finishes, and a grant nobody receives is
        // given back at once instead of staying held until its lease ends.
        let (answer, answered) = oneshot::channel();
        let api = self.clone();
        tokio::spawn(async move {
            let mut answer = answer;
            let result = api.engine.acquire(&req, deadline, answer.closed()).await;
            if let Err(Ok(Acquired::Granted(grant))) = answer.send(result) {
                api.give_back(&req.name, grant).await;
            }
        });
        let acquired = answered
            .await
            .map_err(|_| Status::internal("the acquire task ended without an answer"))??;
        Ok(Response::new(acquired_response(acquired)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let m = request.into_inner();
        let name = self.name(m.name)?;
        let token = self.token(&m.token)?;
        let request_id = self.request_id(&m.request_id)?;
        let released = self.engine.release(&name, token, request_id).await;
        metrics::counter!(telemetry::RELEASES, "outcome" => release_outcome(&released))
            .increment(1);
        Ok(Response::new(release_response(released?)))
    }

    async fn extend(
        &self,
        request: Request<pb::ExtendRequest>,
    ) -> Result<Response<pb::ExtendResponse>, Status> {
        let m = request.into_inner();
        let name = self.name(m.name)?;
        let token = self.token(&m.token)?;
        let lease = self.lease(m.lease)?;
        let lease = self.engine.extend(&name, token, lease).await?;
        Ok(Response::new(pb::ExtendResponse {
            lease: Some(to_proto(lease)),
        }))
    }

    type HoldStream = ReceiverStream<Result<pb::HoldResponse, Status>>;

    async fn hold(
        &self,
        request: Request<Streaming<pb::HoldRequest>>,
    ) -> Result<Response<Self::HoldStream>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let permit = self.hold_streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server already has {} open Hold streams, the limit (max_hold_streams)",
                self.limits.max_hold_streams
            ))
        })?;
        let (out, stream) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            api.run_hold(request.into_inner(), out, timeout).await;
            drop(permit);
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let name = self.name(request.into_inner().name)?;
        let state = self.engine.inspect(&name).await?;
        Ok(Response::new(pb::InspectResponse {
            held: state.held,
            fence: state.fence,
            ttl: state.held.then(|| to_proto(state.ttl)),
            hold_count: state.holds,
            waiters: state.waiters,
        }))
    }

    async fn force_release(
        &self,
        request: Request<pb::ForceReleaseRequest>,
    ) -> Result<Response<pb::ForceReleaseResponse>, Status> {
        let m = request.into_inner();
        let name = self.name(m.name)?;
        let request_id = self.request_id(&m.request_id)?;
        let released = self.engine.force_release(&name, request_id).await?;
        Ok(Response::new(pb::ForceReleaseResponse { released }))
    }
}
