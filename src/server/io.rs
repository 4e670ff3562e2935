//! The client connection's byte stream, with a guard against clients that stop reading.
//!
//! hyper only polls a response body when the client socket can take more bytes, so a
//! client that stops reading would freeze the exchange forever, holding a Gunicorn
//! worker. Here a write that stays blocked longer than the current route's idle timer
//! fails with `TimedOut`, which makes hyper drop the connection and, with it, the
//! upstream request.
//!
//! "Blocked" means the client took no byte at all. The kernel reports a TCP socket
//! writable again only once a third of its send buffer is free, and that buffer grows
//! to megabytes: a client reading slowly but steadily can leave the socket "unwritable"
//! for longer than the limit. So when the limit is reached the write is retried on the
//! socket itself, past the runtime's readiness; only if the send buffer is still full
//! (nothing left since the write blocked) does the guard fire.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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

/// What a connection has done, as counters its driver compares over time to tell
/// that it is idle: no exchange under way, none started and no byte read since the
/// last look.
#[derive(Debug, Default)]
pub struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
    reads: AtomicU64,
}

/// A moment of a connection's [`Activity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivitySnapshot {
    started: u64,
    finished: u64,
    reads: u64,
}

impl ActivitySnapshot {
    pub fn exchange_under_way(&self) -> bool {
        self.started != self.finished
    }

    pub fn started_since(&self, earlier: &ActivitySnapshot) -> bool {
        self.started != earlier.started
    }
}

impl Activity {
    /// Marks an exchange as under way until the returned guard is dropped.
    pub fn exchange(self: &Arc<Self>) -> ExchangeUnderWay {
        self.started.fetch_add(1, Ordering::Relaxed);
        ExchangeUnderWay(self.clone())
    }

    pub fn snapshot(&self) -> ActivitySnapshot {
        ActivitySnapshot {
            started: self.started.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
        }
    }
}

/// An exchange on the connection, from its request head to the end of its response
/// body (or its cancellation).
pub struct ExchangeUnderWay(Arc<Activity>);

impl Drop for ExchangeUnderWay {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// A client stream whose blocked writes time out.
pub struct ClientStream<S> {
    inner: S,
    limit: WriteStallLimit,
    timer: Option<Pin<Box<Sleep>>>,
    stalled: bool,
    /// Bytes read from the socket that a previous HTTP/1 session left unparsed.
    unread: Bytes,
    activity: Arc<Activity>,
}

impl<S> ClientStream<S> {
    pub fn new(inner: S, limit: WriteStallLimit, activity: Arc<Activity>) -> ClientStream<S> {
        ClientStream {
            inner,
            limit,
            timer: None,
            stalled: false,
            unread: Bytes::new(),
            activity,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes to hand out before reading the socket again.
    pub fn unread(&mut self, bytes: Bytes) {
        self.unread = bytes;
    }

    /// Called when a write could not progress: arms the stall timer, and says whether it
    /// has expired (with its limit).
    fn stall_expired(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let limit = self.limit.get()?;
        if !self.stalled {
            let deadline = Instant::now() + limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.stalled = true;
        }
        match self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Some(limit),
            _ => None,
        }
    }

    /// Passes a write's result on, running the stall guard while it is pending; when the
    /// guard's limit is reached, `retry` tries the write once more on the socket itself.
    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
        retry: impl FnOnce(&S) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.stalled = false;
            return result;
        }
        let Some(limit) = self.stall_expired(cx) else {
            return Poll::Pending;
        };
        match retry(&self.inner) {
            // The client took bytes since the write blocked: not stalled, start over.
            Ok(written) => {
                self.stalled = false;
                Poll::Ready(Ok(written))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?} (idle timer)"),
            ))),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// A transport that can attempt a write on the spot, whatever the runtime last learned
/// about its readiness.
pub trait WriteNow {
    /// A non-blocking write attempt: `WouldBlock` when the send buffer is full.
    fn write_now(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
}

impl WriteNow for TcpStream {
    fn write_now(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // The socket is non-blocking (tokio made it so).
        socket2::SockRef::from(self).send_vectored(bufs)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            if self.unread.is_empty() {
                // An empty slice still holds the old session's whole read buffer.
                self.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        read
    }
}

impl<S: AsyncWrite + WriteNow + Unpin> AsyncWrite for ClientStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(result, cx, |s| s.write_now(&[io::IoSlice::new(buf)]))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(result, cx, |s| s.write_now(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(result, cx, |_| Err(io::ErrorKind::WouldBlock.into()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
