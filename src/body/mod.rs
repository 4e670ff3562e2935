//! Streaming bodies and the rules that bound them.
//!
//! Bodies are never collected: each frame is handed on as soon as the other side can
//! take it, so hyper's backpressure bounds memory per request. [`RequestBody`] carries
//! the client's upload upstream (re-emitting the bytes a GraphQL peek already read),
//! enforces `max_request_body` mid-stream, and reports its progress so the request's
//! timers know whether the client or the upstream is the silent one.
//! [`ResponseBody`] carries the answer back with the idle and total timers, and turns
//! any late failure into an aborted transfer, never a short body that looks complete.

mod file;
mod relay;
mod response;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::RouteMetrics;

pub use file::{FileStream, CHUNK as FILE_CHUNK};
pub use response::{ResponseBody, UpstreamStream};

/// Why a body stream stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the client stopped sending its request body: {0}")]
    ClientAborted(hyper::Error),
    #[error("the upstream's response body failed: {0}")]
    UpstreamAborted(crate::upstream::WireError),
    #[error("the upstream sent nothing for {0:?} (idle timer)")]
    UpstreamIdle(Duration),
    #[error("the exchange passed its total limit of {0:?}")]
    TotalElapsed(Duration),
    #[error(
        "the client took nothing for {0:?} (idle timer; its HTTP/2 stream window stayed shut)"
    )]
    ClientStalled(Duration),
    /// What the client's side of a relayed body reports when the relay stopped early;
    /// the relay itself logged why.
    #[error("the transfer was cut short")]
    Cut,
    #[error("reading the file from disk failed: {0}")]
    File(std::io::Error),
    #[error("compressing the response failed: {0}")]
    Compression(std::io::Error),
}

/// Shared between the request body (polled by the upstream connection's task) and the
/// request handler, which runs the upload-side timers.
#[derive(Debug)]
pub struct UploadProgress {
    origin: Instant,
    /// Milliseconds after `origin` of the last chunk taken from the client.
    last_chunk_ms: AtomicU64,
    /// Milliseconds after `origin` when the body ended; `u64::MAX` while it has not.
    finished_ms: AtomicU64,
    /// Whether the body is waiting for the client (rather than for the upstream to read).
    waiting_on_client: AtomicBool,
    finished: Notify,
}

impl UploadProgress {
    pub fn new() -> Arc<UploadProgress> {
        Arc::new(UploadProgress {
            origin: Instant::now(),
            last_chunk_ms: AtomicU64::new(0),
            finished_ms: AtomicU64::new(u64::MAX),
            waiting_on_client: AtomicBool::new(false),
            finished: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    fn chunk_moved(&self) {
        self.last_chunk_ms.store(self.now_ms(), Ordering::Relaxed);
        self.waiting_on_client.store(false, Ordering::Relaxed);
    }

    fn finish(&self) {
        if self.finished_ms.load(Ordering::Relaxed) == u64::MAX {
            self.finished_ms.store(self.now_ms(), Ordering::Release);
            self.finished.notify_one();
        }
    }

    /// When the body was fully sent, if it was.
    pub fn finished_at(&self) -> Option<Instant> {
        let ms = self.finished_ms.load(Ordering::Acquire);
        (ms != u64::MAX).then(|| self.at(ms))
    }

    /// When the last chunk moved (or the exchange began).
    pub fn last_chunk_at(&self) -> Instant {
        self.at(self.last_chunk_ms.load(Ordering::Relaxed))
    }

    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(Ordering::Relaxed)
    }

    /// Resolves once the body has ended (at once if it already has).
    pub async fn wait_finished(&self) {
        if self.finished_at().is_none() {
            self.finished.notified().await;
        }
    }
}

/// The request body sent upstream.
#[derive(Debug)]
pub struct RequestBody {
    /// Bytes already read from the client (by the GraphQL peek), sent first.
    prefix: Option<Bytes>,
    inner: Option<Incoming>,
    limit: Option<u64>,
    received: u64,
    progress: Option<Arc<UploadProgress>>,
    /// Where the bytes forwarded are counted when the body is dropped.
    counted_in: Option<Arc<RouteMetrics>>,
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(metrics) = &self.counted_in {
            metrics.bytes_received.add(self.received);
        }
    }
}

impl RequestBody {
    /// A body with no bytes (GET, HEAD, or a client body that is already empty).
    pub fn empty() -> RequestBody {
        RequestBody {
            prefix: None,
            inner: None,
            limit: None,
            received: 0,
            progress: None,
            counted_in: None,
        }
    }

    /// The client's body, preceded by `prefix`, bounded by `limit` bytes in all.
    pub fn streaming(
        prefix: Option<Bytes>,
        inner: Incoming,
        limit: Option<u64>,
        progress: Arc<UploadProgress>,
    ) -> RequestBody {
        RequestBody {
            prefix: prefix.filter(|p| !p.is_empty()),
            inner: Some(inner),
            limit,
            received: 0,
            progress: Some(progress),
            counted_in: None,
        }
    }

    /// Counts the forwarded bytes in `metrics` when the body is done.
    pub fn counted_in(mut self, metrics: Arc<RouteMetrics>) -> RequestBody {
        self.counted_in = Some(metrics);
        self
    }

    /// The upload's progress, watched by the request's timers.
    pub fn progress(&self) -> Option<Arc<UploadProgress>> {
        self.progress.clone()
    }

    /// Counts bytes against the limit and marks progress for the upload timers.
    fn count(&mut self, len: usize) -> Result<(), BodyError> {
        self.received += len as u64;
        if let Some(limit) = self.limit.filter(|limit| self.received > *limit) {
            self.inner = None;
            return Err(BodyError::TooLarge { limit });
        }
        if let Some(p) = &self.progress {
            p.chunk_moved();
        }
        Ok(())
    }

    /// hyper stops polling once `is_end_stream` is true, so the end is noticed when the
    /// last frame leaves, not on a poll that never comes.
    fn finish_if_ended(&mut self) {
        if self.is_end_stream() {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.inner = None;
        if let Some(p) = &self.progress {
            p.finish();
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            this.count(prefix.len())?;
            this.finish_if_ended();
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.count(data.len())?;
                        this.finish_if_ended();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // Trailers are not forwarded: we strip `TE` and the upstream is HTTP/1.1.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => {
                    this.inner = None;
                    return Poll::Ready(Some(Err(BodyError::ClientAborted(e))));
                }
                Poll::Ready(None) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if let Some(p) = &this.progress {
                        p.waiting_on_client.store(true, Ordering::Relaxed);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self
            .inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + prefix);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + prefix);
        }
        hint
    }
}
