//! Response bodies, the JSON error shape, and bounded request-body reads.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, SizeHint};
use hyper::{header, Response, StatusCode};
use serde::Serialize;

/// Every role answers with this body: one in hand, as nearly every answer is, held as it is (no
/// allocation and no virtual calls per answer), or a stream (SSE), boxed.
pub enum Body {
    Whole(Full<Bytes>),
    Stream(BoxBody<Bytes, Infallible>),
}

impl Body {
    /// An answer streamed as `body` yields it.
    pub fn stream<B>(body: B) -> Self
    where
        B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
    {
        Body::Stream(body.boxed())
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Whole(body) => Pin::new(body).poll_frame(cx),
            Body::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Whole(body) => body.is_end_stream(),
            Body::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Whole(body) => body.size_hint(),
            Body::Stream(body) => body.size_hint(),
        }
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::Whole(Full::new(bytes.into()))
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("serializing a response value");
    with_type(status, "application/json", full(bytes))
}

pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    with_type(status, content_type, full(body))
}

/// `{"error":{"code","message"}}`, the one error shape of every endpoint.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        },
    )
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body was not received within {0:?}")]
    Timeout(Duration),
    #[error("reading the request body failed: {0}")]
    Read(String),
}

/// Reads at most `limit` bytes of body within `timeout` (slow-loris bodies are cut off).
///
/// The timer is armed only when the body is not already there: hyper hands over a body that came
/// with its headers before the service first asks for it, so nearly every vote skips the timer
/// (the runtime's clock read and handle, and the timer wheel under its lock).
pub async fn read_body<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut collect = pin!(Limited::new(body, limit).collect());
    let mut deadline = pin!(None::<tokio::time::Sleep>);
    let read = poll_fn(|cx| {
        if let Poll::Ready(read) = collect.as_mut().poll(cx) {
            return Poll::Ready(Some(read));
        }
        if deadline.is_none() {
            deadline.set(Some(tokio::time::sleep(timeout)));
        }
        match deadline.as_mut().as_pin_mut().map(|d| d.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    })
    .await;
    match read {
        None => Err(BodyError::Timeout(timeout)),
        Some(Ok(collected)) => Ok(collected.to_bytes()),
        Some(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge(limit))
        }
        Some(Err(e)) => Err(BodyError::Read(e.to_string())),
    }
}
