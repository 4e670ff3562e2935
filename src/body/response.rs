//! The response body sent to the client, and the timers that guard it once the
//! response head has left.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::relay::Relayed;
use super::{BodyError, FileStream};
use crate::access_log::Exchange;
use crate::compress::Compressed;
use crate::config::Compression;
use crate::upstream::{Framing, Pace, PooledConnection, WireError};

/// What the client receives: a short generated body, the upstream's stream or a file,
/// possibly compressed on the way. It carries the exchange's log record, written when
/// the body is done or dropped, with the bytes actually sent (compressed ones).
pub struct ResponseBody {
    kind: Kind,
    exchange: Option<Box<Exchange>>,
    /// Whatever must live exactly as long as the transfer: the upstream slot, the
    /// route's and the client's places under their limits.
    held: Option<Box<dyn Send + Sync>>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamStream>),
    File(Box<FileStream>),
    /// Another body without its log record: the record stays outside and counts the
    /// compressed bytes.
    Compressed(Box<Compressed<ResponseBody>>),
    /// Another body, with its record, relayed by a task of its own (HTTP/2).
    Relayed(Relayed),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let bytes = bytes.into();
        ResponseBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            exchange: None,
            held: None,
        }
    }

    pub fn upstream(stream: UpstreamStream) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream(Box::new(stream)),
            exchange: None,
            held: None,
        }
    }

    pub fn file(stream: FileStream) -> ResponseBody {
        ResponseBody {
            kind: Kind::File(Box::new(stream)),
            exchange: None,
            held: None,
        }
    }

    /// This body, compressed as it streams.
    pub fn compressed(mut self, coding: Compression) -> ResponseBody {
        let exchange = self.exchange.take();
        ResponseBody {
            kind: Kind::Compressed(Box::new(Compressed::new(self, coding))),
            exchange,
            held: None,
        }
    }

    /// Keeps `guard` alive until this body is done or dropped. One guard per body (a
    /// tuple for several): a list would cost every proxied response an allocation.
    pub fn hold(mut self, guard: Box<dyn Send + Sync>) -> ResponseBody {
        debug_assert!(self.held.is_none(), "a body holds one guard");
        self.held = Some(guard);
        self
    }

    /// Attaches the log record; it is written when this body is dropped.
    pub fn logged(mut self, exchange: Box<Exchange>) -> ResponseBody {
        self.exchange = Some(exchange);
        self
    }

    /// On HTTP/2, this body relayed so that a client which stops reading is cut after
    /// the route's idle time (see `relay`). A body with nothing left to send holds
    /// nothing and stays as it is.
    pub fn guarded_against_stalls(self) -> ResponseBody {
        let idle = self.exchange.as_ref().and_then(|ex| ex.client_idle);
        let Some(idle) = idle.filter(|_| !self.is_end_stream()) else {
            return self;
        };
        ResponseBody {
            kind: Kind::Relayed(Relayed::spawn(self, idle)),
            exchange: None,
            held: None,
        }
    }

    pub(super) fn record_abort(&mut self, error: &BodyError) {
        if let Some(ex) = self.exchange.as_deref_mut() {
            if let Some(m) = ex.metrics() {
                match error {
                    BodyError::UpstreamIdle(_) | BodyError::ClientStalled(_) => m.timeouts[2].inc(),
                    BodyError::TotalElapsed(_) => m.timeouts[3].inc(),
                    _ => {}
                }
            }
            tracing::warn!(
                route = %ex.route,
                request_id = ?ex.request_id,
                sent_bytes = ex.bytes_sent,
                after = ?ex.started.elapsed(),
                "response aborted after its head was sent: {error}"
            );
            ex.abort(error.to_string());
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if !self.is_end_stream() {
            if let Some(ex) = self.exchange.as_deref_mut() {
                ex.body_left_unfinished();
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(stream) => stream.poll_data(cx),
            Kind::File(file) => file.poll_data(cx),
            Kind::Compressed(body) => Pin::new(body.as_mut()).poll_frame(cx),
            Kind::Relayed(relayed) => relayed.poll_data(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(ex), Some(data)) = (this.exchange.as_deref_mut(), frame.data_ref()) {
                    ex.bytes_sent += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => this.record_abort(e),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(stream) => stream.framing.is_end(),
            Kind::File(file) => file.remaining() == 0,
            Kind::Compressed(body) => body.is_end_stream(),
            Kind::Relayed(relayed) => relayed.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(stream) => match stream.framing.remaining() {
                Some(exact) => SizeHint::with_exact(exact),
                None => SizeHint::default(),
            },
            Kind::File(file) => SizeHint::with_exact(file.remaining()),
            Kind::Compressed(body) => body.size_hint(),
            Kind::Relayed(relayed) => relayed.size_hint(),
        }
    }
}

/// The upstream's response body with the route's idle and total timers.
///
/// The idle timer runs only while we wait for the upstream: time spent waiting for a
/// slow client to take the bytes is the client connection's concern (its write stall
/// guard), not upstream silence.
pub struct UpstreamStream {
    framing: Framing,
    pace: Pace,
    /// The body is read from it; returned to the pool at the end of the body, closed if
    /// the body is dropped early.
    connection: Option<PooledConnection>,
    /// A failure noticed right after passing bytes on, reported on the next poll.
    failed: Option<WireError>,
    idle: Option<Duration>,
    idle_timer: Option<Pin<Box<Sleep>>>,
    idle_armed: bool,
    total: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl UpstreamStream {
    /// `total` is the route's total limit with the instant the exchange began.
    pub fn new(
        framing: Framing,
        connection: PooledConnection,
        idle: Option<Duration>,
        total: Option<(Duration, Instant)>,
    ) -> UpstreamStream {
        let mut stream = UpstreamStream {
            framing,
            pace: Pace::default(),
            connection: Some(connection),
            failed: None,
            idle,
            idle_timer: None,
            idle_armed: false,
            total: total
                .map(|(limit, began)| (limit, Box::pin(tokio::time::sleep_until(began + limit)))),
        };
        if stream.framing.is_end() {
            stream.release_connection();
        }
        stream
    }

    fn release_connection(&mut self) {
        if let Some(conn) = self.connection.take() {
            conn.release();
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some((limit, timer)) = &mut self.total {
            if timer.as_mut().poll(cx).is_ready() {
                let limit = *limit;
                return self.fail(BodyError::TotalElapsed(limit));
            }
        }
        if let Some(error) = self.failed.take() {
            return self.fail(BodyError::UpstreamAborted(error));
        }
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(None);
        };
        match connection
            .conn()
            .poll_body(cx, &mut self.framing, &mut self.pace)
        {
            Poll::Ready(Some(Ok(data))) => {
                self.idle_armed = false;
                // hyper stops polling once `is_end_stream` is true (the last frame of a
                // Content-Length body), so the end is noticed here, not on a poll that
                // never comes; dropped unreleased, the connection would be closed
                // instead of pooled.
                if self.framing.is_end() {
                    self.release_connection();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                // hyper drops what it has queued for the client when a body fails, and
                // it polls again before writing: the bytes already passed on go out
                // first, the failure on the next poll.
                self.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.release_connection();
                Poll::Ready(None)
            }
            Poll::Pending => self.poll_idle(cx),
        }
    }

    /// Called while the upstream has nothing for us: runs the idle timer.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(idle) = self.idle else {
            return Poll::Pending;
        };
        if !self.idle_armed {
            let deadline = Instant::now() + idle;
            match &mut self.idle_timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.idle_timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.idle_armed = true;
        }
        let Some(timer) = self.idle_timer.as_mut() else {
            return Poll::Pending;
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => self.fail(BodyError::UpstreamIdle(idle)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Dropping the connection closes it: a half-read response is never reused.
        self.connection = None;
        self.total = None;
        self.idle = None;
        Poll::Ready(Some(Err(error)))
    }
}
