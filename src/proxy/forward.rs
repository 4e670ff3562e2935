//! The forward phase: a slot on a server, a connection, the request sent, and the wait
//! for the response head under the route's timers.
//!
//! Retries only when safe: when no connection could be made, or a pooled connection
//! turned out closed under us before anything came back or was taken from the client,
//! the request goes again; once the upstream may have seen it, only an idempotent
//! request without a body is sent again, to another server, and never a POST. Timeouts
//! are never retried: the request may still be running upstream.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response};
use http_body::Body as _;
use tokio::time::Instant;

use super::{ProxyError, TimerKind};
use crate::access_log::Exchange;
use crate::body::{BodyError, RequestBody, UploadProgress};
use crate::config::Timeouts;
use crate::metrics::{Stage, Tracked};
use crate::upstream::{
    codec, ConnectError, Endpoint, ExtraFields, Framing, PooledConnection, SendError, Slot,
    Upstream, WireError,
};

/// What the forward phase needs to know about the exchange.
pub(super) struct Forward<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub timeouts: Timeouts,
    /// The record being kept: when the exchange started, its route and request id.
    pub exchange: &'a Exchange,
    pub tracked: &'a Tracked,
}

/// Whether `request` may go to another server after a failure the upstream may have
/// seen: idempotent, and no body (a body cannot be read from the client twice).
fn replayable(request: &Request<RequestBody>, servers: usize) -> bool {
    servers > 1 && codec::is_idempotent(request.method()) && request.body().is_end_stream()
}

impl Forward<'_> {
    /// Sends `request` and returns the response head, the connection its body will come
    /// on, and the server slot to hold until that body is done.
    pub async fn run(
        &self,
        mut request: Request<RequestBody>,
        extra: &ExtraFields,
    ) -> Result<(Response<Framing>, PooledConnection, Slot), ProxyError> {
        let timers = HeadTimers {
            timeouts: self.timeouts,
            total_deadline: self.timeouts.total.0.map(|t| self.exchange.started + t),
            progress: request.body().progress(),
        };
        let servers = self.upstream.servers().len();
        let replayable = replayable(&request, servers);
        let mut fresh_connection = false;
        let mut failure = ProxyError::UpstreamClosed;
        for _attempt in 0..=servers {
            self.tracked.set_stage(Stage::Queued);
            let slot = timers.admit(self.upstream).await?;
            if !self.upstream.preserve_host {
                request
                    .headers_mut()
                    .insert(header::HOST, slot.server.host_header.clone());
            }
            self.tracked.set_stage(Stage::Connecting);
            let mut connection = match timers.connect(&slot.server, fresh_connection).await {
                Ok(connection) => connection,
                Err(error @ ProxyError::Connect(_)) => {
                    self.count_failure(&error);
                    slot.server_failed();
                    failure = error;
                    continue;
                }
                Err(error) => return Err(error),
            };
            self.tracked.set_stage(Stage::WaitingForUpstream);
            let sent_at = Instant::now();
            let sending = connection.send(&mut request, extra, sent_at);
            let error = match timers.await_head(sending, sent_at).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    slot.server.responses[usize::from(status / 100).clamp(1, 5) - 1].inc();
                    if matches!(status, 502..=504) {
                        slot.server_failed();
                    }
                    if let Some(failure) = WorkerFailure::answered(&response) {
                        diagnose_worker_kill(self.upstream, self.exchange, failure);
                        if let WorkerFailure::ErrorPage = failure {
                            // Its bare page says nothing: the client gets the proxy's
                            // explanation, as when an older Gunicorn drops the connection.
                            return Err(ProxyError::WorkerFailed);
                        }
                    }
                    return Ok((response, connection, slot));
                }
                Err(HeadError::Failed(failure)) => return Err(failure),
                Err(HeadError::Send(SendError::RequestBody(error))) => {
                    return Err(body_failure(error))
                }
                Err(HeadError::Send(SendError::Upstream { unsent: true, .. })) => {
                    // A pooled connection closed under us: send it again, on a new one.
                    fresh_connection = true;
                    self.upstream.metrics.retries.inc();
                    continue;
                }
                Err(HeadError::Send(SendError::Upstream { error, .. })) => error,
            };
            failure = classify(error);
            if !matches!(
                failure,
                ProxyError::UpstreamClosed | ProxyError::UpstreamIo(_)
            ) {
                return Err(failure);
            }
            self.count_failure(&failure);
            slot.server_failed();
            diagnose_worker_kill(self.upstream, self.exchange, WorkerFailure::Dropped);
            if !replayable {
                return Err(failure);
            }
            self.upstream.metrics.retries.inc();
        }
        Err(failure)
    }

    fn count_failure(&self, failure: &ProxyError) {
        let m = &self.upstream.metrics;
        match failure {
            ProxyError::Connect(ConnectError::Timeout(_)) => m.connect_timeout.inc(),
            ProxyError::Connect(_) => m.connect_failed.inc(),
            ProxyError::UpstreamClosed => m.closed_early.inc(),
            ProxyError::InvalidResponse(_) => m.invalid_response.inc(),
            _ => m.io_error.inc(),
        }
    }
}

/// How an upstream failed the way Gunicorn fails when it kills a worker.
#[derive(Debug, Clone, Copy)]
enum WorkerFailure {
    /// The connection dropped with no response.
    Dropped,
    /// The application's `500` with `Connection: close`.
    Answered500,
    /// Gunicorn's own error page: see [`WorkerFailure::answered`].
    ErrorPage,
}

impl WorkerFailure {
    /// Whether a response head looks like a failed worker, and how. Gunicorn's own error
    /// page, written when a worker fails or is killed mid-request: `500`, `Connection:
    /// close`, a small HTML body, and no `Server` field, which Gunicorn puts on every
    /// response of the application (GeoNature's own error pages are JSON besides). Any
    /// other `500` with `Connection: close` may be the application's worker dying at
    /// Gunicorn's `--timeout`.
    fn answered(head: &Response<Framing>) -> Option<WorkerFailure> {
        let headers = head.headers();
        if head.status() != http::StatusCode::INTERNAL_SERVER_ERROR
            || !super::headers::wants_close(headers)
        {
            return None;
        }
        let html = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
        let error_page = html
            && matches!(head.body(), Framing::Length(n) if *n <= 1024)
            && !headers.contains_key(header::SERVER);
        Some(if error_page {
            WorkerFailure::ErrorPage
        } else {
            WorkerFailure::Answered500
        })
    }
}

/// Logs and counts a likely Gunicorn worker kill: a failure at about the upstream's
/// `worker_timeout`, or Gunicorn's own error page whenever it comes (a stock GeoNature
/// kills at 30 s, whatever the proxy's configuration says).
fn diagnose_worker_kill(upstream: &Upstream, exchange: &Exchange, failure: WorkerFailure) {
    let elapsed = exchange.started.elapsed();
    let what = match failure {
        WorkerFailure::Dropped => "dropped the connection without a response",
        WorkerFailure::ErrorPage => {
            "answered with Gunicorn's own error page (500, no Server field)"
        }
        WorkerFailure::Answered500 => "answered 500 and closed",
    };
    let at_worker_timeout = upstream.worker_timeout.filter(|&limit| {
        let tolerance = (limit / 10).max(Duration::from_secs(2));
        elapsed + tolerance >= limit && elapsed <= limit + tolerance
    });
    let error_page = matches!(failure, WorkerFailure::ErrorPage);
    if at_worker_timeout.is_none() && !error_page {
        return;
    }
    upstream.metrics.worker_kills.inc();
    match at_worker_timeout {
        Some(worker_timeout) => tracing::warn!(
            route = %exchange.route,
            upstream = %upstream.name,
            request_id = ?exchange.request_id,
            ?elapsed,
            ?worker_timeout,
            "the upstream {what} after {elapsed:.1?}, about its worker_timeout of {worker_timeout:?}: \
             Gunicorn most likely killed the worker at its --timeout; raise GUNICORN_TIMEOUT above \
             this route's timers (and worker_timeout in the proxy config with it)"
        ),
        None => tracing::warn!(
            route = %exchange.route,
            upstream = %upstream.name,
            request_id = ?exchange.request_id,
            ?elapsed,
            worker_timeout = ?upstream.worker_timeout,
            "the upstream {what} after {elapsed:.1?}: its worker failed or was killed, most likely \
             at Gunicorn's --timeout (GUNICORN_TIMEOUT, 30 s in a stock GeoNature); raise it above \
             this route's timers and set worker_timeout in the proxy config to the same value"
        ),
    }
}

enum HeadError {
    /// The exchange failed on the connection or in the client's body.
    Send(SendError),
    /// A timer fired.
    Failed(ProxyError),
}

/// The timers that run until the response head arrives.
struct HeadTimers {
    timeouts: Timeouts,
    total_deadline: Option<Instant>,
    /// Present when a request body is being uploaded.
    progress: Option<Arc<UploadProgress>>,
}

impl HeadTimers {
    /// A slot on a server, waiting at most until the total deadline.
    async fn admit(&self, upstream: &Arc<Upstream>) -> Result<Slot, ProxyError> {
        let unavailable =
            |e| ProxyError::Unavailable(e, upstream.queue_timeout.max(Duration::from_secs(1)));
        match self.total_deadline {
            None => upstream.admit().await.map_err(unavailable),
            Some(deadline) => match tokio::time::timeout_at(deadline, upstream.admit()).await {
                Ok(admitted) => admitted.map_err(unavailable),
                Err(_) => Err(ProxyError::Timeout {
                    timer: TimerKind::Total,
                    limit: self.timeouts.total.0.unwrap_or_default(),
                }),
            },
        }
    }

    /// A connection under the connect timer (or what is left of the total one).
    async fn connect(
        &self,
        upstream: &Arc<Endpoint>,
        fresh: bool,
    ) -> Result<PooledConnection, ProxyError> {
        let mut limit = self.timeouts.connect.0;
        let mut total_is_shorter = false;
        if let Some(deadline) = self.total_deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if limit.is_none_or(|l| remaining < l) {
                limit = Some(remaining);
                total_is_shorter = true;
            }
        }
        let connecting = if fresh {
            upstream.connect(limit).await
        } else {
            upstream.checkout(limit).await
        };
        connecting.map_err(|e| match (e, self.timeouts.total.0) {
            (ConnectError::Timeout(_), Some(total)) if total_is_shorter => ProxyError::Timeout {
                timer: TimerKind::Total,
                limit: total,
            },
            (e, _) => ProxyError::Connect(e),
        })
    }

    /// Waits for the response head. While the body uploads, the idle timer watches the
    /// silent side; once it is sent, the response-header timer runs.
    async fn await_head<F>(
        &self,
        sending: F,
        sent_at: Instant,
    ) -> Result<Response<Framing>, HeadError>
    where
        F: Future<Output = Result<Response<Framing>, SendError>>,
    {
        tokio::pin!(sending);
        loop {
            let next = self.next_deadline(sent_at);
            let uploading = self.progress.as_ref().filter(|p| p.finished_at().is_none());
            let sleep_until = next.map_or_else(far_future, |(at, _)| at);
            tokio::select! {
                biased;
                result = &mut sending => return result.map_err(HeadError::Send),
                _ = wait_upload_end(uploading), if uploading.is_some() => continue,
                _ = tokio::time::sleep_until(sleep_until) => {
                    if let Some((at, timer)) = self.next_deadline(sent_at) {
                        if at <= Instant::now() {
                            return Err(HeadError::Failed(self.expired(timer)));
                        }
                    }
                }
            }
        }
    }

    /// The earliest deadline now in force, and which timer it belongs to.
    fn next_deadline(&self, sent_at: Instant) -> Option<(Instant, TimerKind)> {
        let phase = match &self.progress {
            Some(p) => match p.finished_at() {
                None => self
                    .timeouts
                    .idle
                    .0
                    .map(|idle| (p.last_chunk_at() + idle, TimerKind::Idle)),
                Some(done) => self
                    .timeouts
                    .response_header
                    .0
                    .map(|t| (done + t, TimerKind::ResponseHeader)),
            },
            None => self
                .timeouts
                .response_header
                .0
                .map(|t| (sent_at + t, TimerKind::ResponseHeader)),
        };
        let total = self.total_deadline.map(|at| (at, TimerKind::Total));
        match (phase, total) {
            (Some(p), Some(t)) => Some(if t.0 <= p.0 { t } else { p }),
            (p, t) => p.or(t),
        }
    }

    fn expired(&self, timer: TimerKind) -> ProxyError {
        let limit = |t: crate::config::Timer| t.0.unwrap_or_default();
        match timer {
            TimerKind::Idle
                if self
                    .progress
                    .as_ref()
                    .is_some_and(|p| p.waiting_on_client()) =>
            {
                ProxyError::ClientBodyTimeout {
                    limit: limit(self.timeouts.idle),
                }
            }
            TimerKind::Idle => ProxyError::Timeout {
                timer,
                limit: limit(self.timeouts.idle),
            },
            TimerKind::ResponseHeader => ProxyError::Timeout {
                timer,
                limit: limit(self.timeouts.response_header),
            },
            TimerKind::Total | TimerKind::Connect => ProxyError::Timeout {
                timer: TimerKind::Total,
                limit: limit(self.timeouts.total),
            },
        }
    }
}

async fn wait_upload_end(progress: Option<&Arc<UploadProgress>>) {
    match progress {
        Some(p) => p.wait_finished().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// What the client is told when its own body failed on the way up.
fn body_failure(error: BodyError) -> ProxyError {
    match error {
        BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit },
        _ => ProxyError::ClientAborted,
    }
}

/// What the client is told when the upstream failed before a usable head.
fn classify(error: WireError) -> ProxyError {
    match error {
        WireError::Closed => ProxyError::UpstreamClosed,
        WireError::Malformed(malformed) => ProxyError::InvalidResponse(malformed.to_string()),
        WireError::Io(e) => ProxyError::UpstreamIo(e.to_string()),
    }
}
