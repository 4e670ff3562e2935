//! What an upstream sends back, as the proxy reads it: the response head (with any 1xx
//! before it) and, for a chunked body, the chunk framing. Input: a split point byte,
//! then the bytes, fed in two pieces as two reads would bring them.
#![no_main]

use bytes::BytesMut;
use http::Method;
use libfuzzer_sys::fuzz_target;
use quadrige_proxy::upstream::codec::{self, Framing, Step, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(wire.len());
    for method in [Method::GET, Method::HEAD] {
        read_response(wire, split, &method);
    }
});

fn read_response(wire: &[u8], split: usize, method: &Method) {
    let mut buf = BytesMut::from(&wire[..split]);
    let mut rest = &wire[split..];
    let head = loop {
        let before = buf.len();
        match codec::take_head(&mut buf, method) {
            Ok(Some(head)) => break head,
            Ok(None) if rest.is_empty() => return,
            Ok(None) => {
                assert!(
                    buf.len() < MAX_HEAD,
                    "a partial head over the limit was kept"
                );
                assert!(buf.len() <= before, "bytes appeared");
                buf.extend_from_slice(rest);
                rest = &[];
            }
            Err(_) => return,
        }
    };
    let mut framing = *head.response.body();
    if *method == Method::HEAD {
        assert_eq!(framing, Framing::Empty, "a HEAD response has no body");
    }
    if !matches!(framing, Framing::Chunked(_)) {
        return;
    }
    let headers = head.response.headers();
    assert!(
        !headers.contains_key(http::header::CONTENT_LENGTH),
        "Content-Length kept next to chunked"
    );
    buf.extend_from_slice(rest);
    let available = buf.len();
    let mut body = 0;
    let mut steps = 0;
    while framing != Framing::Done {
        steps += 1;
        assert!(
            steps <= 4 * available + 4,
            "the chunked decoder does not advance"
        );
        let left = buf.len();
        match codec::step_chunked(&mut buf, &mut framing) {
            Ok(Step::Data(data)) => {
                assert!(!data.is_empty(), "an empty data piece");
                body += data.len();
            }
            Ok(Step::Again) => assert!(buf.len() < left, "framing consumed nothing"),
            Ok(Step::Short) | Err(_) => break,
        }
    }
    assert!(body <= available, "more body than bytes");
}
