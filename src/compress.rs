//! On-the-fly response compression: Apache's `AddOutputFilterByType DEFLATE
//! application/json application/geo+json`, per route, with gzip and brotli.
//!
//! [`apply`] decides from the response head alone, so a 10 GiB export is compressed as
//! it streams. A response is compressed when the route has `compress`, its media type
//! is listed, the client accepts one of the route's algorithms (`q=0` refuses), it is a
//! 2xx other than 204/206, it carries no `Content-Encoding` and no `Content-Range`,
//! `Cache-Control` does not say `no-transform`, it is not the answer to a HEAD, and its
//! declared length (if any) reaches `min_size`. ZIP files are excluded simply by not
//! being listed: compressing compressed data only costs CPU.
//!
//! A compressed response loses `Content-Length` and `Accept-Ranges` (ranges of the
//! identity bytes mean nothing in the compressed stream), gains `Content-Encoding`, and
//! its ETag is weakened: the bytes differ, so a strong validator would lie to a cache
//! or to `If-Range`. `Vary: Accept-Encoding` goes on every response that *could* have
//! been compressed, whether or not this client accepted it (nginx's `gzip_vary`), so a
//! shared cache never hands a gzip body to a client that cannot read it.
//!
//! Flush policy: the encoder is flushed whenever the upstream has nothing ready (its
//! body returns `Pending`) after new input. A fast upstream is never pending, so the
//! encoder fills whole blocks and the ratio stays good; a slow trickle (a long export
//! writing a feature now and then) reaches the client at once instead of sitting in
//! the encoder's window. This is what nginx does with `proxy_buffering off`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder};
use async_compression::Level;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::body::{BodyError, ResponseBody};
use crate::config::{CompressConfig, Compression};

/// Brotli quality for on-the-fly compression: 11 (the library default) is for
/// precompressing at build time and runs at a few MB/s; 5 keeps most of the gain at
/// gzip-like speed (nginx's brotli module defaults to 6).
const BROTLI_QUALITY: i32 = 5;
/// Brotli's window as a power of two: 512 KiB (nginx's default) bounds the encoder's
/// memory per response instead of the library's 4 MiB.
const BROTLI_WINDOW: i32 = 19;

impl Compression {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Compression::Brotli => "br",
            Compression::Gzip => "gzip",
        }
    }

    /// The file name suffix of a precompressed sibling.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::Brotli => ".br",
            Compression::Gzip => ".gz",
        }
    }

    fn matches(self, token: &str) -> bool {
        match self {
            Compression::Brotli => token.eq_ignore_ascii_case("br"),
            // RFC 9110 §8.4.1.3: x-gzip is an alias of gzip.
            Compression::Gzip => {
                token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip")
            }
        }
    }
}

/// What compression needs from the request, taken before the request is forwarded.
#[derive(Debug, Clone)]
pub struct ClientAccepts {
    head: bool,
    accept_encoding: Option<String>,
}

impl ClientAccepts {
    pub fn of(request: &Parts) -> ClientAccepts {
        ClientAccepts {
            head: request.method == Method::HEAD,
            accept_encoding: accept_encoding(&request.headers),
        }
    }
}

/// Every `Accept-Encoding` line as one list (RFC 9110 §5.3: repeated lines are one
/// comma-separated field); `None` when the client sent none.
pub fn accept_encoding(headers: &HeaderMap) -> Option<String> {
    let lines: Vec<&str> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!lines.is_empty()).then(|| lines.join(","))
}

/// The codings among `offered` that `Accept-Encoding` accepts, best first: highest
/// q-value, then the order of `offered` (the operator's preference). A coding not named
/// gets the q of `*` when there is one; `q=0` refuses it.
pub fn accepted(accept_encoding: Option<&str>, offered: &[Compression]) -> Vec<Compression> {
    let Some(text) = accept_encoding else {
        return Vec::new();
    };
    let mut ranked: Vec<(u16, usize, Compression)> = offered
        .iter()
        .enumerate()
        .filter_map(|(rank, &coding)| {
            let q = quality_of(text, |t| coding.matches(t))
                .or_else(|| quality_of(text, |t| t == "*"))?;
            (q > 0).then_some((q, rank, coding))
        })
        .collect();
    ranked.sort_by_key(|&(q, rank, _)| (std::cmp::Reverse(q), rank));
    ranked.into_iter().map(|(_, _, coding)| coding).collect()
}

/// The q-value (in thousandths) of the first element whose coding `is` accepts; an
/// element with an unreadable q counts as refused, so a garbled header never leads to
/// an encoding the client cannot read.
fn quality_of(list: &str, is: impl Fn(&str) -> bool) -> Option<u16> {
    list.split(',').find_map(|element| {
        let mut params = element.split(';');
        let coding = params.next()?.trim();
        if coding.is_empty() || !is(coding) {
            return None;
        }
        let q = params
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1000), |(_, value)| parse_q(value.trim()));
        Some(q.unwrap_or(0))
    })
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn parse_q(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{fraction:0<3}").parse::<u16>().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether the route compresses bodies of this `Content-Type`.
pub fn compresses_type(config: &CompressConfig, content_type: Option<&HeaderValue>) -> bool {
    let Some(media) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let media = media.split(';').next().unwrap_or("").trim();
    config.types.iter().any(|t| t.eq_ignore_ascii_case(media))
}

/// Compresses `response` when the route, the response and the client allow it (see the
/// module documentation), and marks it `Vary: Accept-Encoding` when it could have been.
pub fn apply(
    config: Option<&CompressConfig>,
    client: &ClientAccepts,
    mut response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let Some(config) = config else {
        return response;
    };
    if !eligible(config, response.status(), response.headers()) {
        return response;
    }
    add_vary(response.headers_mut());
    if client.head {
        return response;
    }
    let Some(&coding) = accepted(client.accept_encoding.as_deref(), &config.algorithms).first()
    else {
        return response;
    };
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    weaken_etag(headers);
    response.map(|body| body.compressed(coding))
}

/// Everything but the client's `Accept-Encoding` and the method.
fn eligible(config: &CompressConfig, status: StatusCode, headers: &HeaderMap) -> bool {
    let status_ok = status.is_success()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::PARTIAL_CONTENT;
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let big_enough = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_none_or(|len| len >= config.min_size && len > 0);
    status_ok
        && identity
        && big_enough
        && !headers.contains_key(header::CONTENT_RANGE)
        && !has_token(headers, &header::CACHE_CONTROL, "no-transform")
        && compresses_type(config, headers.get(header::CONTENT_TYPE))
}

/// Whether a comma-separated header names `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: &header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Adds `Accept-Encoding` to `Vary`, merging the existing values into one header.
pub fn add_vary(headers: &mut HeaderMap) {
    if has_token(headers, &header::VARY, "accept-encoding")
        || has_token(headers, &header::VARY, "*")
    {
        return;
    }
    let mut merged: Vec<String> = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    merged.push("Accept-Encoding".into());
    if let Ok(value) = HeaderValue::from_str(&merged.join(", ")) {
        headers.insert(header::VARY, value);
    }
}

/// `"x"` becomes `W/"x"`: the compressed bytes are not the ones the strong tag named.
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(strong) = headers
        .get(header::ETAG)
        .filter(|v| v.as_bytes().starts_with(b"\""))
    else {
        return;
    };
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(strong.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, value);
    }
}

/// A streaming encoder writing into an in-memory buffer that the body drains after
/// every step, so it never holds more than one input chunk's worth of output.
enum Encoder {
    Gzip(GzipEncoder<Vec<u8>>),
    /// Boxed: brotli's state is kilobytes, gzip's a pointer or two.
    Brotli(Box<BrotliEncoder<Vec<u8>>>),
}

impl Encoder {
    /// `len` is the body's length when known: brotli then sizes its tables for it,
    /// which makes small JSON answers a quarter cheaper.
    fn new(coding: Compression, len: Option<u64>) -> Encoder {
        match coding {
            // Level 6, zlib's default and Apache mod_deflate's.
            Compression::Gzip => {
                Encoder::Gzip(GzipEncoder::with_quality(Vec::new(), Level::Default))
            }
            Compression::Brotli => {
                let mut params = async_compression::brotli::EncoderParams::default()
                    .quality(Level::Precise(BROTLI_QUALITY))
                    .window_size(BROTLI_WINDOW);
                if let Some(len) = len.and_then(|l| usize::try_from(l).ok()) {
                    params = params.size_hint(len);
                }
                Encoder::Brotli(Box::new(BrotliEncoder::with_params(Vec::new(), params)))
            }
        }
    }

    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Unpin + Send)> {
        match self {
            Encoder::Gzip(e) => Pin::new(e),
            Encoder::Brotli(e) => Pin::new(e.as_mut()),
        }
    }

    fn output(&mut self) -> &mut Vec<u8> {
        match self {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Brotli(e) => e.get_mut(),
        }
    }

    /// Compressed bytes produced so far, if any.
    fn take_output(&mut self) -> Option<Bytes> {
        let out = std::mem::take(self.output());
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    fn write(&mut self, cx: &mut Context<'_>, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match ready_or_stalled(self.writer().poll_write(cx, data))? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => data = &data[n..],
            }
        }
        Ok(())
    }

    /// A sync flush: everything written so far becomes decodable by the client.
    fn flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        ready_or_stalled(self.writer().poll_flush(cx))
    }

    /// Writes the stream's trailer (gzip CRC and length, brotli's last block).
    fn finish(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        ready_or_stalled(self.writer().poll_shutdown(cx))
    }
}

/// The encoder writes into a `Vec`, which is always ready: a `Pending` would mean a
/// broken invariant, and is turned into an error rather than a transfer that hangs.
fn ready_or_stalled<T>(poll: Poll<io::Result<T>>) -> io::Result<T> {
    match poll {
        Poll::Ready(result) => result,
        Poll::Pending => Err(io::Error::other("the encoder unexpectedly stalled")),
    }
}

/// What polling a body for its next frame gives.
type Polled = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

/// A body compressed as it streams. An error from the inner body or the encoder ends
/// it with an error, which aborts the transfer: a client never gets a truncated stream
/// that decompresses into something that looks complete.
pub struct Compressed<B> {
    inner: B,
    encoder: Encoder,
    /// Input went into the encoder since the last flush.
    unflushed: bool,
    ended: bool,
}

impl<B: Body> Compressed<B> {
    pub fn new(inner: B, coding: Compression) -> Compressed<B> {
        let len = inner.size_hint().exact();
        Compressed {
            inner,
            encoder: Encoder::new(coding, len),
            unflushed: false,
            ended: false,
        }
    }

    fn fail(&mut self, error: BodyError) -> Polled {
        self.ended = true;
        Poll::Ready(Some(Err(error)))
    }

    fn emit(&mut self) -> Option<Polled> {
        self.encoder
            .take_output()
            .map(|out| Poll::Ready(Some(Ok(Frame::data(out)))))
    }

    /// The inner body has nothing ready: flush what it gave so the client is not kept
    /// waiting for it, or wait.
    fn on_pending(&mut self, cx: &mut Context<'_>) -> Polled {
        if !self.unflushed {
            return Poll::Pending;
        }
        self.unflushed = false;
        if let Err(e) = self.encoder.flush(cx) {
            return self.fail(BodyError::Compression(e));
        }
        self.emit().unwrap_or(Poll::Pending)
    }

    fn on_end(&mut self, cx: &mut Context<'_>) -> Polled {
        self.ended = true;
        if let Err(e) = self.encoder.finish(cx) {
            return Poll::Ready(Some(Err(BodyError::Compression(e))));
        }
        self.emit().unwrap_or(Poll::Ready(None))
    }
}

impl<B> Body for Compressed<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = &mut *self;
        while !this.ended {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Err(e) = this.encoder.write(cx, &data) {
                        return this.fail(BodyError::Compression(e));
                    }
                    this.unflushed = true;
                    if let Some(ready) = this.emit() {
                        return ready;
                    }
                }
                Poll::Ready(Some(Err(e))) => return this.fail(e),
                Poll::Ready(None) => return this.on_end(cx),
                Poll::Pending => return this.on_pending(cx),
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted_for(header: &str) -> Vec<Compression> {
        accepted(Some(header), &[Compression::Brotli, Compression::Gzip])
    }

    #[test]
    fn negotiation_follows_q_values_then_the_configured_order() {
        use Compression::*;
        assert_eq!(accepted_for("gzip, deflate, br"), vec![Brotli, Gzip]);
        assert_eq!(accepted_for("gzip;q=1.0, br;q=0.5"), vec![Gzip, Brotli]);
        assert_eq!(accepted_for("br;q=0, gzip"), vec![Gzip]);
        assert_eq!(accepted_for("BR ; Q=0.000, x-gzip"), vec![Gzip]);
        assert_eq!(accepted_for("*"), vec![Brotli, Gzip]);
        assert_eq!(accepted_for("*;q=0.1, br;q=0"), vec![Gzip]);
        assert_eq!(accepted_for("identity"), Vec::<Compression>::new());
        assert_eq!(
            accepted_for("gzip;q=2, br;q=0.3x"),
            Vec::<Compression>::new()
        );
        assert!(accepted(None, &[Gzip]).is_empty());
        let mut two_lines = HeaderMap::new();
        two_lines.append(header::ACCEPT_ENCODING, HeaderValue::from_static("br;q=0"));
        two_lines.append(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let joined = accept_encoding(&two_lines);
        assert_eq!(accepted(joined.as_deref(), &[Brotli, Gzip]), vec![Gzip]);
    }

    #[test]
    fn vary_is_merged_once() {
        let mut h = HeaderMap::new();
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        h.append(
            header::VARY,
            HeaderValue::from_static("Cookie, Authorization"),
        );
        add_vary(&mut h);
        assert_eq!(
            h[header::VARY],
            "Origin, Cookie, Authorization, Accept-Encoding"
        );
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);
        let mut star = HeaderMap::new();
        star.insert(header::VARY, HeaderValue::from_static("*"));
        add_vary(&mut star);
        assert_eq!(star[header::VARY], "*");
    }

    /// A body that plays a script: `Some(bytes)` is a frame, `None` one `Pending`.
    struct Script(std::collections::VecDeque<Option<Bytes>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Polled {
            match self.0.pop_front() {
                Some(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Some(None) => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    /// Polls once with a no-op waker.
    fn poll_once(body: &mut Compressed<Script>) -> Polled {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(body).poll_frame(&mut cx)
    }

    fn gunzip_partial(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        decoder.write_all(data).unwrap();
        decoder.flush().unwrap();
        std::mem::take(decoder.get_mut())
    }

    #[test]
    fn what_the_upstream_gave_is_flushed_as_soon_as_it_has_nothing_more() {
        let first = Bytes::from(r#"[{"id":1,"nom":"Observation 1"},"#.repeat(50));
        let rest = Bytes::from(r#"{"id":2,"nom":"Observation 2"}]"#);
        let script = vec![Some(first.clone()), None, None, Some(rest.clone())];
        let mut body = Compressed::new(Script(script.into()), Compression::Gzip);
        let Poll::Ready(Some(Ok(frame))) = poll_once(&mut body) else {
            panic!("the first chunk was held back");
        };
        let out = frame.into_data().unwrap();
        assert_eq!(
            gunzip_partial(&out),
            first,
            "all of the first chunk is decodable"
        );
        assert!(
            poll_once(&mut body).is_pending(),
            "nothing new: no empty flush"
        );
        let mut all = out.to_vec();
        while let Poll::Ready(Some(Ok(frame))) = poll_once(&mut body) {
            all.extend_from_slice(&frame.into_data().unwrap());
        }
        assert!(body.is_end_stream());
        assert_eq!(gunzip_partial(&all), [first, rest].concat());
    }

    /// The encoder keeps at most one block of input (brotli's is about 1 MiB at this
    /// quality and window, deflate's far less) before it emits it, whatever the length.
    #[test]
    fn output_is_streamed_in_bounded_frames_and_errors_end_the_stream() {
        // Bytes that barely compress: the worst case for output size.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        let chunk = 64 << 10;
        let script: Vec<_> = noise
            .chunks(chunk)
            .map(|c| Some(Bytes::copy_from_slice(c)))
            .collect();
        let mut body = Compressed::new(Script(script.into()), Compression::Brotli);
        let (mut all, mut frames) = (Vec::new(), 0);
        while let Poll::Ready(Some(Ok(frame))) = poll_once(&mut body) {
            let data = frame.into_data().unwrap();
            assert!(data.len() <= 2 << 20, "a frame of {} bytes", data.len());
            all.extend_from_slice(&data);
            frames += 1;
        }
        assert!(
            frames >= 4,
            "the output came in {frames} frames: it was held back"
        );
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(
            &mut brotli::Decompressor::new(all.as_slice(), 4096),
            &mut decoded,
        )
        .unwrap();
        assert!(decoded == noise);

        struct Failing;
        impl Body for Failing {
            type Data = Bytes;
            type Error = BodyError;
            fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Polled {
                Poll::Ready(Some(Err(BodyError::UpstreamIdle(
                    std::time::Duration::from_secs(1),
                ))))
            }
        }
        let mut failing = Compressed::new(Failing, Compression::Gzip);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = Pin::new(&mut failing).poll_frame(&mut cx);
        assert!(matches!(
            polled,
            Poll::Ready(Some(Err(BodyError::UpstreamIdle(_))))
        ));
        assert!(failing.is_end_stream());
        assert!(matches!(
            Pin::new(&mut failing).poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }

    #[test]
    fn strong_etags_are_weakened_and_weak_ones_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
    }
}
