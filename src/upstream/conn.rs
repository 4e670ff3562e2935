//! One HTTP/1.1 connection to a server, driven by the request's own task.
//!
//! No connection task, no channel: the exchange writes the request head straight from
//! the handler, streams the body, and the response body is read from the socket when the
//! client side asks for the next bytes. So a stalled client stops the reads, the buffer
//! in between is the only copy, and it is sized by how fast the bytes actually leave
//! (small for a slow reader, large for a fast download).

use std::future::poll_fn;
use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use super::codec::{self, ExtraFields, Framing, Head, Malformed, Step};
use crate::body::{BodyError, RequestBody};
use crate::config::UpstreamAddress;

/// What a response head is read with.
const HEAD_READ: usize = 8 * 1024;
/// Response body reads: from a slow reader's size up to a fast download's.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 512 * 1024;
/// The read size is reconsidered after each mebibyte passed on.
const PACE_WINDOW: usize = 1 << 20;
/// A pooled connection the upstream closed fails within a round trip; one that fails
/// later was closed while the upstream worked on the request.
const STALE_CLOSE_WINDOW: Duration = Duration::from_secs(1);

/// Why an exchange with the upstream failed on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the upstream closed the connection before its response was complete")]
    Closed,
    #[error("invalid response: {0}")]
    Malformed(#[from] Malformed),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Why [`Conn::send`] returned no response head.
#[derive(Debug)]
pub enum SendError {
    Upstream {
        error: WireError,
        /// A pooled connection the upstream had closed: an idempotent request, nothing
        /// taken from the client, nothing back, and the failure came at once (not after
        /// the upstream worked on it, as when Gunicorn kills a worker), so it may go
        /// again on a new connection.
        unsent: bool,
    },
    /// The client's body failed (too large, client gone).
    RequestBody(BodyError),
}

enum Failure {
    Wire(WireError),
    Body(BodyError),
}

impl From<WireError> for Failure {
    fn from(error: WireError) -> Failure {
        Failure::Wire(error)
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Failure {
        Failure::Wire(WireError::Io(error))
    }
}

impl From<Malformed> for Failure {
    fn from(error: Malformed) -> Failure {
        Failure::Wire(WireError::Malformed(error))
    }
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Io {
    async fn readable(&self) -> io::Result<()> {
        match self {
            Io::Tcp(s) => s.readable().await,
            Io::Unix(s) => s.readable().await,
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            Io::Tcp(s) => s.writable().await,
            Io::Unix(s) => s.writable().await,
        }
    }
}

macro_rules! on_io {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            Io::Tcp($s) => $e,
            Io::Unix($s) => $e,
        }
    };
}

/// An open connection and the bytes read from it but not yet passed on.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// The last exchange ended with nothing left over: it may carry the next one.
    clean: bool,
    /// The upstream keeps the connection open after this response, and the whole
    /// request went out.
    keep_alive: bool,
    upload_done: bool,
    /// Bytes came back during this exchange.
    received: bool,
    /// A frame of the client's body was taken (it cannot be sent again).
    body_taken: bool,
}

impl Conn {
    pub async fn open(address: &UpstreamAddress) -> io::Result<Conn> {
        let io = match address {
            UpstreamAddress::Tcp { authority } => {
                let stream = TcpStream::connect(authority.as_str()).await?;
                stream.set_nodelay(true)?;
                Io::Tcp(stream)
            }
            UpstreamAddress::Unix(path) => Io::Unix(UnixStream::connect(path).await?),
        };
        Ok(Conn {
            io,
            buf: BytesMut::new(),
            clean: true,
            keep_alive: true,
            upload_done: true,
            received: false,
            body_taken: false,
        })
    }

    /// The last exchange left the connection ready for another.
    pub fn is_reusable(&self) -> bool {
        self.clean
    }

    /// Before the connection waits in the pool: a fast download's large read buffer is
    /// let go, so idle connections hold at most a head-sized one.
    pub fn settle(&mut self) {
        if self.buf.capacity() > 2 * HEAD_READ {
            self.buf = BytesMut::new();
        }
    }

    /// An idle connection the upstream has not closed and sent nothing on. Costs a
    /// system call only when the reactor saw the socket become readable.
    pub fn is_alive(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match on_io!(&self.io, s => s.poll_read_ready(&mut cx)) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let peeked = on_io!(&self.io, s => s.try_read(&mut [0u8; 1]));
                matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends `request` (its body streamed) and reads the response head. The request stays
    /// with the caller, so it can go again when the error says it was never sent.
    /// `sent_at` is now, as the caller's timers already read it.
    pub async fn send(
        &mut self,
        request: &mut Request<RequestBody>,
        extra: &ExtraFields,
        reused: bool,
        sent_at: tokio::time::Instant,
    ) -> Result<Response<Framing>, SendError> {
        self.clean = false;
        self.received = false;
        self.body_taken = false;
        match self.exchange(request, extra).await {
            Ok(head) => Ok(self.accept(head)),
            Err(Failure::Body(error)) => Err(SendError::RequestBody(error)),
            Err(Failure::Wire(error)) => {
                let stale = match &error {
                    WireError::Closed => true,
                    WireError::Io(e) => matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::ConnectionAborted
                    ),
                    WireError::Malformed(_) => false,
                };
                let unsent = reused
                    && stale
                    && !self.received
                    && !self.body_taken
                    && codec::is_idempotent(request.method())
                    && sent_at.elapsed() < STALE_CLOSE_WINDOW;
                Err(SendError::Upstream { error, unsent })
            }
        }
    }

    async fn exchange(
        &mut self,
        request: &mut Request<RequestBody>,
        extra: &ExtraFields,
    ) -> Result<Head, Failure> {
        let method = request.method().clone();
        let has_body = !request.body().is_end_stream();
        let chunked = has_body && !request.headers().contains_key(header::CONTENT_LENGTH);
        let head = codec::encode_head(request, extra, chunked);
        self.upload_done = !has_body;
        let early = if has_body {
            self.upload(head, request.body_mut(), chunked, &method)
                .await?
        } else {
            self.write(&mut [IoSlice::new(&head)], &method).await?
        };
        match early {
            Some(head) => Ok(head),
            None => self.read_head(&method).await,
        }
    }

    fn accept(&mut self, head: Head) -> Response<Framing> {
        self.keep_alive = head.keep_alive && self.upload_done;
        if head.response.body().is_end() {
            self.finish_body();
        }
        head.response
    }

    /// Streams the client's body after the head (in the same write as its first chunk
    /// when that is already there), watching for a response that comes before the end.
    async fn upload(
        &mut self,
        head: Vec<u8>,
        body: &mut RequestBody,
        chunked: bool,
        method: &Method,
    ) -> Result<Option<Head>, Failure> {
        let mut head = Some(head);
        loop {
            let frame = if head.is_some() {
                match poll_once(body).await {
                    Some(frame) => frame,
                    None => {
                        let head = head.take().unwrap_or_default();
                        match self.write(&mut [IoSlice::new(&head)], method).await? {
                            Some(early) => return Ok(Some(early)),
                            None => continue,
                        }
                    }
                }
            } else {
                tokio::select! {
                    biased;
                    ready = self.io.readable() => {
                        ready?;
                        match self.read_early(method)? {
                            Some(early) => return Ok(Some(early)),
                            None => continue,
                        }
                    }
                    frame = body.frame() => frame,
                }
            };
            let data = match frame {
                None => Bytes::new(),
                Some(Err(error)) => return Err(Failure::Body(error)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            self.body_taken = true;
            let head = head.take().unwrap_or_default();
            let mut size_line = [0u8; 20];
            let (size, tail): (&[u8], &[u8]) = match (chunked, data.is_empty()) {
                (false, _) => (&[], &[]),
                (true, true) => (&[], b"0\r\n\r\n"),
                (true, false) => (chunk_size_line(data.len(), &mut size_line), b"\r\n"),
            };
            let mut parts = [
                IoSlice::new(&head),
                IoSlice::new(size),
                IoSlice::new(&data),
                IoSlice::new(tail),
            ];
            if let Some(early) = self.write(&mut parts, method).await? {
                return Ok(Some(early));
            }
            if data.is_empty() {
                self.upload_done = true;
                return Ok(None);
            }
        }
    }

    /// Writes `parts` to the end. A response head that arrives first (the upstream
    /// answering before reading the whole body) is returned instead; so is one found
    /// after the upstream stopped reading and closed.
    async fn write(
        &mut self,
        mut parts: &mut [IoSlice<'_>],
        method: &Method,
    ) -> Result<Option<Head>, Failure> {
        IoSlice::advance_slices(&mut parts, 0);
        while !parts.is_empty() {
            match on_io!(&self.io, s => s.try_write_vectored(parts)) {
                Ok(0) => return Err(WireError::Closed.into()),
                Ok(n) => IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::select! {
                        biased;
                        ready = self.io.readable() => {
                            ready?;
                            if let Some(early) = self.read_early(method)? {
                                return Ok(Some(early));
                            }
                        }
                        ready = self.io.writable() => ready?,
                    }
                }
                Err(e) => {
                    return match self.read_head(method).await {
                        Ok(head) => Ok(Some(head)),
                        Err(_) => Err(e.into()),
                    }
                }
            }
        }
        Ok(None)
    }

    /// Reads what is there without waiting; a complete head is returned.
    fn read_early(&mut self, method: &Method) -> Result<Option<Head>, Failure> {
        self.make_room(HEAD_READ);
        match self.read_some() {
            Ok(0) => Err(WireError::Closed.into()),
            Ok(_) => {
                self.received = true;
                Ok(codec::take_head(&mut self.buf, method)?)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_head(&mut self, method: &Method) -> Result<Head, Failure> {
        loop {
            if let Some(head) = codec::take_head(&mut self.buf, method)? {
                return Ok(head);
            }
            if poll_fn(|cx| self.poll_fill(cx, HEAD_READ)).await? == 0 {
                return Err(WireError::Closed.into());
            }
            self.received = true;
        }
    }

    /// The next piece of the response body, `None` at its end.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        framing: &mut Framing,
        pace: &mut Pace,
    ) -> Poll<Option<Result<Bytes, WireError>>> {
        loop {
            let data = match framing {
                Framing::Empty | Framing::Done | Framing::Length(0) => {
                    self.finish_body();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => (!self.buf.is_empty()).then(|| {
                    let n = self
                        .buf
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    self.buf.split_to(n).freeze()
                }),
                Framing::Close => (!self.buf.is_empty()).then(|| self.buf.split().freeze()),
                Framing::Chunked(_) => match codec::step_chunked(&mut self.buf, framing) {
                    Ok(Step::Data(data)) => Some(data),
                    Ok(Step::Again) => continue,
                    Ok(Step::Short) => None,
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
            };
            if let Some(data) = data {
                pace.passed(data.len());
                if framing.is_end() {
                    self.finish_body();
                }
                return Poll::Ready(Some(Ok(data)));
            }
            match ready!(self.poll_fill(cx, pace.size)) {
                Ok(0) if *framing == Framing::Close => {
                    *framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(WireError::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    /// Bytes beyond the response (a short `Content-Length`, a pipelined surprise) mean
    /// the upstream and we disagree on where it ended: the connection is not reused.
    fn finish_body(&mut self) {
        self.clean = self.keep_alive && self.buf.is_empty();
    }

    /// Reads into the buffer, `want` bytes of room at least.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.make_room(want);
        loop {
            ready!(on_io!(&self.io, s => s.poll_read_ready(cx)))?;
            match self.read_some() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => return Poll::Ready(read),
            }
        }
    }

    /// Room for `want` more bytes: the block in use when nothing else holds it, or a new
    /// one of exactly that size (the bytes not yet passed on are moved over). Never
    /// `BytesMut::reserve`, which doubles a block it grows, nor a block more than twice
    /// the size needed, so a slow stream does not keep a fast one's.
    fn make_room(&mut self, want: usize) {
        let len = self.buf.len();
        if self.buf.capacity() - len < want {
            // Whether it worked is checked below, with the size.
            let _ = self.buf.try_reclaim(want);
        }
        let capacity = self.buf.capacity();
        if capacity - len >= want && capacity <= 2 * (len + want) {
            return;
        }
        let mut block = BytesMut::with_capacity(len + want);
        block.extend_from_slice(&self.buf);
        self.buf = block;
    }

    /// One read into the buffer's free room. A read that did not fill it drained the
    /// socket, so the readiness is dropped there, as nginx does: the next read then
    /// waits for the reactor instead of costing a system call that says `EAGAIN` (one
    /// per request, since we always read for the answer just after asking). Bytes that
    /// arrive later raise a new edge, and a reactor that saw one meanwhile keeps it.
    fn read_some(&mut self) -> io::Result<usize> {
        let room = self.buf.capacity() - self.buf.len();
        let (io, buf) = (&self.io, &mut self.buf);
        let mut got = None;
        let read = on_io!(io, s => s.try_io(Interest::READABLE, || {
            let n = s.try_read_buf(buf)?;
            got = Some(n);
            if n > 0 && n < room {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        }));
        match (read, got) {
            (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            (read, _) => read,
        }
    }
}

/// `Some` with the body's next frame if it is there now, `None` if it is not (the waker
/// is registered either way).
async fn poll_once(
    body: &mut RequestBody,
) -> Option<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
    poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

fn chunk_size_line(len: usize, line: &mut [u8; 20]) -> &[u8] {
    let mut rest = &mut line[..];
    // 16 hex digits and CRLF always fit in 20 bytes.
    let _ = write!(rest, "{len:x}\r\n");
    let used = 20 - rest.len();
    &line[..used]
}

/// How fast a response body leaves, to size the reads: each window of a mebibyte passed
/// on quickly doubles the read size, a slow one brings it back to the minimum.
pub struct Pace {
    size: usize,
    since: Option<Instant>,
    bytes: usize,
}

/// Read size above the minimum that all response bodies together may hold. Large reads
/// speed up a fast download; but every client looks fast while the kernel's buffers
/// between us fill, so a crowd of slow readers starting together would all take them.
const LARGE_READ_BUDGET: usize = 1 << 20;
static LARGE_READS: AtomicUsize = AtomicUsize::new(0);

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            size: MIN_READ,
            since: None,
            bytes: 0,
        }
    }
}

impl Drop for Pace {
    fn drop(&mut self) {
        LARGE_READS.fetch_sub(self.size - MIN_READ, Ordering::Relaxed);
    }
}

impl Pace {
    /// 1 MiB within 4 ms is 256 MB/s: a client on a fast link, worth larger reads.
    const FAST: Duration = Duration::from_millis(4);
    /// Slower than 32 MB/s, large reads would only hold memory.
    const SLOW: Duration = Duration::from_millis(32);

    fn passed(&mut self, bytes: usize) {
        let since = *self.since.get_or_insert_with(Instant::now);
        self.bytes += bytes;
        if self.bytes < PACE_WINDOW {
            return;
        }
        let now = Instant::now();
        let took = now.duration_since(since);
        if took <= Self::FAST {
            self.resize((self.size * 2).min(MAX_READ));
        } else if took >= Self::SLOW {
            self.resize(MIN_READ);
        }
        self.since = Some(now);
        self.bytes = 0;
    }

    /// Growing takes from the shared budget, and is skipped when it is spent.
    fn resize(&mut self, size: usize) {
        if size > self.size {
            let extra = size - self.size;
            if LARGE_READS.fetch_add(extra, Ordering::Relaxed) + extra > LARGE_READ_BUDGET {
                LARGE_READS.fetch_sub(extra, Ordering::Relaxed);
                return;
            }
        } else {
            LARGE_READS.fetch_sub(self.size - size, Ordering::Relaxed);
        }
        self.size = size;
    }

    /// The read size now in force.
    pub fn read_size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_going_idle_lets_a_large_buffer_go() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let authority = listener.local_addr().expect("address").to_string();
        let mut conn = Conn::open(&UpstreamAddress::Tcp { authority })
            .await
            .expect("connect");
        conn.buf = BytesMut::with_capacity(HEAD_READ);
        conn.settle();
        assert_eq!(
            conn.buf.capacity(),
            HEAD_READ,
            "a head-sized buffer is kept"
        );
        conn.buf = BytesMut::with_capacity(MAX_READ);
        conn.settle();
        assert!(conn.buf.capacity() <= 2 * HEAD_READ);
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut line = [0u8; 20];
        assert_eq!(chunk_size_line(26, &mut line), b"1a\r\n");
        assert_eq!(
            chunk_size_line(usize::MAX, &mut line),
            b"ffffffffffffffff\r\n"
        );
    }

    /// One test for everything the shared budget touches, so no other test races it.
    #[test]
    fn reads_grow_for_fast_bodies_within_the_budget_and_shrink_for_slow_ones() {
        let run_fast = |pace: &mut Pace, windows: usize| {
            for _ in 0..windows * PACE_WINDOW / MIN_READ {
                pace.passed(MIN_READ);
            }
        };
        let mut fast = Pace::default();
        run_fast(&mut fast, 8);
        assert_eq!(fast.read_size(), MAX_READ);
        let mut crowd: Vec<Pace> = (0..16).map(|_| Pace::default()).collect();
        for pace in &mut crowd {
            run_fast(pace, 8);
        }
        let above_minimum: usize = std::iter::once(&fast)
            .chain(&crowd)
            .map(|p| p.read_size() - MIN_READ)
            .sum();
        assert!(above_minimum <= LARGE_READ_BUDGET, "{above_minimum}");
        assert_eq!(crowd[15].read_size(), MIN_READ, "the budget was spent");
        drop(crowd);
        fast.passed(PACE_WINDOW / 2);
        std::thread::sleep(Pace::SLOW);
        fast.passed(PACE_WINDOW / 2);
        assert_eq!(fast.read_size(), MIN_READ);
        drop(fast);
        assert_eq!(LARGE_READS.load(Ordering::Relaxed), 0, "all given back");
    }
}
