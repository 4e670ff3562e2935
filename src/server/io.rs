//! The client connection's byte stream, with a guard against clients that stop reading.
//!
//! hyper only polls a response body when the client socket can take more bytes, so a
//! client that stops reading would freeze the exchange forever, holding a Gunicorn
//! worker. Here a write that stays blocked longer than the current route's idle timer
//! fails with `TimedOut`, which makes hyper drop the connection and, with it, the
//! upstream request.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The longest a write may stay blocked on this connection; set per request.
#[derive(Debug, Clone, Default)]
pub struct WriteStallLimit(Arc<AtomicU64>);

impl WriteStallLimit {
    pub fn new(limit: Option<Duration>) -> WriteStallLimit {
        let this = WriteStallLimit::default();
        this.set(limit);
        this
    }

    /// `None` disables the guard.
    pub fn set(&self, limit: Option<Duration>) {
        let millis = limit.map_or(0, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        self.0.store(millis, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// A client stream whose blocked writes time out.
pub struct ClientStream<S> {
    inner: S,
    limit: WriteStallLimit,
    timer: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl<S> ClientStream<S> {
    pub fn new(inner: S, limit: WriteStallLimit) -> ClientStream<S> {
        ClientStream {
            inner,
            limit,
            timer: None,
            stalled: false,
        }
    }

    /// Called when a write could not progress: arms or checks the stall timer.
    fn poll_stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(limit) = self.limit.get() else {
            return Poll::Pending;
        };
        if !self.stalled {
            let deadline = Instant::now() + limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.stalled = true;
        }
        match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?} (idle timer)"),
            ))),
            _ => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.poll_stall(cx),
            ready => {
                self.stalled = false;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
