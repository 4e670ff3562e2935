//! The client connection's byte stream, with a guard against clients that stop reading.
//!
//! hyper only polls a response body when the client socket can take more bytes, so a
//! client that stops reading would freeze the exchange forever, holding a Gunicorn
//! worker. Here a write that stays blocked longer than the current route's idle timer
//! fails with `TimedOut`, which makes hyper drop the connection and, with it, the
//! upstream request.
//!
//! "Blocked" means the client acknowledged no byte at all for that long, as the kernel
//! counts them (`TCP_INFO`). Neither readiness nor room in the send buffer tells: the
//! kernel reports a socket writable only once a third of its send buffer is free, and
//! that buffer grows to megabytes, so a client reading slowly but steadily can leave
//! the socket "unwritable" for longer than the limit; and Linux 6.x keeps growing the
//! send buffer of a connection whose peer advertises a zero window, so a client that
//! reads nothing still makes room for more writes every few hundred milliseconds.
//!
//! [`Resumable`] carries, across a park, what an idle HTTP/1 session had read but not
//! parsed.

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
use tokio_rustls::server::TlsStream;

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
    /// What the client had acknowledged when the current stall window began.
    acked_before_stall: Option<u64>,
    activity: Arc<Activity>,
}

impl<S> ClientStream<S> {
    pub fn new(inner: S, limit: WriteStallLimit, activity: Arc<Activity>) -> ClientStream<S> {
        ClientStream {
            inner,
            limit,
            timer: None,
            stalled: false,
            acked_before_stall: None,
            activity,
        }
    }

    /// Passes a write's result on, running the stall guard while it is pending.
    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>>
    where
        S: AckedBytes,
    {
        if result.is_ready() {
            self.stalled = false;
            return result;
        }
        let Some(limit) = self.limit.get() else {
            return Poll::Pending;
        };
        if !self.stalled {
            self.arm(limit);
        }
        while let Some(Poll::Ready(())) = self.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            match (self.acked_before_stall, self.inner.bytes_acked()) {
                // The client took bytes during the limit: it reads, however slowly.
                (Some(before), Some(now)) if now != before => self.arm(limit),
                // Nothing taken, or no way to know (then the limit alone decides, as
                // nginx's `send_timeout` does).
                _ => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {limit:?} (idle timer)"),
                    )))
                }
            }
        }
        Poll::Pending
    }

    /// Starts a stall window of `limit` from now.
    fn arm(&mut self, limit: Duration)
    where
        S: AckedBytes,
    {
        self.stalled = true;
        self.acked_before_stall = self.inner.bytes_acked();
        let deadline = Instant::now() + limit;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

/// A transport that knows how many bytes its peer has acknowledged.
pub trait AckedBytes {
    /// The bytes the peer acknowledged on this connection so far; `None` when the
    /// system does not say.
    fn bytes_acked(&self) -> Option<u64>;
}

impl AckedBytes for TcpStream {
    #[cfg(target_os = "linux")]
    fn bytes_acked(&self) -> Option<u64> {
        use std::mem::{offset_of, size_of, MaybeUninit};
        use std::os::fd::AsRawFd;
        let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is a writable buffer of `len` bytes for the whole call, and the
        // descriptor stays open while `self` lives.
        let rc = unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        // Kernels before 4.1 fill a shorter struct, without the field.
        let needed = offset_of!(libc::tcp_info, tcpi_bytes_acked) + size_of::<u64>();
        if rc != 0 || (len as usize) < needed {
            return None;
        }
        // SAFETY: zeroed, then partly overwritten by the kernel: every field is an
        // integer, for which any bytes are a valid value.
        Some(unsafe { info.assume_init() }.tcpi_bytes_acked)
    }

    #[cfg(not(target_os = "linux"))]
    fn bytes_acked(&self) -> Option<u64> {
        None
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        read
    }
}

impl<S: AsyncWrite + AckedBytes + Unpin> AsyncWrite for ClientStream<S> {
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

/// A client stream an idle HTTP/1 session can be taken off, and a new session put on
/// once the client sends again (see `server::connection`). What the old session read
/// but left unparsed is handed out first; on TLS it is decrypted text, so it is kept
/// here, above every layer of the stream.
pub struct Resumable<S> {
    stream: S,
    unread: Bytes,
}

/// A stream whose socket can be waited on while no session reads it.
pub trait OnSocket {
    fn socket(&self) -> &TcpStream;
}

impl OnSocket for ClientStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        &self.inner
    }
}

impl OnSocket for TlsStream<ClientStream<TcpStream>> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0.socket()
    }
}

impl<S: OnSocket> Resumable<S> {
    pub fn new(stream: S) -> Resumable<S> {
        Resumable {
            stream,
            unread: Bytes::new(),
        }
    }

    /// Bytes the old session read but left unparsed, for the next one.
    pub fn unread(&mut self, bytes: Bytes) {
        self.unread = bytes;
    }

    pub fn socket(&self) -> &TcpStream {
        self.stream.socket()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Resumable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread.split_to(n));
        if self.unread.is_empty() {
            // An empty slice still holds the old session's whole read buffer.
            self.unread = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Resumable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
