//! The stall guard of an HTTP/2 stream.
//!
//! On HTTP/1 a client that stops reading is noticed on its socket (`server::io`). On
//! HTTP/2 the socket may stay busy with other streams, and hyper simply stops polling a
//! body whose stream window the client keeps shut: the body's own timers are never
//! polled again, so the upstream connection, the Gunicorn worker behind it and the
//! route's place would be held for as long as the client stays connected. Such a body
//! is moved into a task of its own, which hands it on a frame at a time and gives up
//! when the client has taken nothing for the route's idle time, as nginx's
//! `send_timeout` does for a connection.

use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::{BodyError, ResponseBody};

/// What the relay hands on: data, a failure, or the end (`None`). A channel that closes
/// without its end means the relay gave up.
type Item = Option<Result<Bytes, BodyError>>;

/// The client's side of a relayed body.
pub(super) struct Relayed {
    items: mpsc::Receiver<Item>,
    /// What is left to come, when the relayed body knew it exactly.
    remaining: Option<u64>,
    ended: bool,
}

impl Relayed {
    /// Moves `body` into a task that relays it and drops it once the client has taken
    /// nothing for `idle`.
    pub(super) fn spawn(body: ResponseBody, idle: Duration) -> Relayed {
        let remaining = body.size_hint().exact();
        // One item in the channel: a stalled stream holds that, what hyper has taken,
        // and nothing more.
        let (sender, items) = mpsc::channel(1);
        tokio::spawn(relay(body, sender, idle));
        Relayed {
            items,
            remaining,
            ended: false,
        }
    }

    pub(super) fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = ready!(self.items.poll_recv(cx));
        if !matches!(item, Some(Some(Ok(_)))) {
            self.ended = true;
        }
        Poll::Ready(match item {
            Some(Some(Ok(data))) => {
                if let Some(left) = &mut self.remaining {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Some(Ok(Frame::data(data)))
            }
            Some(Some(Err(e))) => Some(Err(e)),
            Some(None) => None,
            None => Some(Err(BodyError::Cut)),
        })
    }

    /// Also true once a body of known length has all been handed on: hyper then ends
    /// the stream with the last data instead of an empty frame after it.
    pub(super) fn is_end(&self) -> bool {
        self.ended || self.remaining == Some(0)
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

async fn relay(mut body: ResponseBody, items: mpsc::Sender<Item>, idle: Duration) {
    loop {
        let next = tokio::select! {
            next = body.frame() => next,
            // The client reset the stream or left: stop reading the upstream at once,
            // not when its next bytes come.
            () = items.closed() => return,
        };
        let item = match next {
            None => None,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Some(Ok(data)),
                // Not data: trailers, which the upstream codec already reads and drops,
                // so none come here.
                Err(_) => continue,
            },
            Some(Err(e)) => Some(Err(e)),
        };
        let last = !matches!(item, Some(Ok(_)));
        match tokio::time::timeout(idle, items.reserve()).await {
            Ok(Ok(slot)) => slot.send(item),
            Ok(Err(_)) => return,
            Err(_) => {
                body.record_abort(&BodyError::ClientStalled(idle));
                return;
            }
        }
        if last {
            return;
        }
    }
}
