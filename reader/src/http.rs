//! The reader's HTTP surface: results from the snapshot, a server-sent event stream per poll,
//! the live page, and health.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metrics::{Counter, Gauge};
use tokio::sync::watch;
use web::{error, json, Body};

use crate::snapshot::Snapshot;

/// A snapshot older than this means no source has answered lately: not ready.
const STALE_AFTER: Duration = Duration::from_secs(3);

pub struct Reader {
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) heartbeat: Duration,
    /// The control room's bearer token: it sees hidden polls' results.
    pub(crate) operator_token: Option<String>,
    pub(crate) metrics: ReaderMetrics,
}

pub(crate) struct ReaderMetrics {
    results_ok: Counter,
    subscribers: Gauge,
    region: String,
}

impl ReaderMetrics {
    pub(crate) fn new(region: &str) -> Self {
        Self {
            results_ok: metrics::counter!("tally_reader_requests_total", "region" => region.to_string(), "route" => "results", "status" => "200"),
            subscribers: metrics::gauge!("tally_reader_subscribers", "region" => region.to_string()),
            region: region.to_string(),
        }
    }

    fn request(&self, route: &'static str, status: StatusCode) {
        metrics::counter!("tally_reader_requests_total", "region" => self.region.clone(), "route" => route, "status" => status.as_str().to_string())
            .increment(1);
    }
}

impl web::Service for Reader {
    async fn call(&self, req: Request<Incoming>, _conn: &web::Connection) -> Response<Body> {
        let path = req.uri().path();
        if let Some(rest) = path.strip_prefix("/v1/polls/") {
            if req.method() != Method::GET {
                return method_not_allowed();
            }
            let operator = self.is_operator(req.headers());
            if let Some(poll) = rest.strip_suffix("/results") {
                return self.results(poll, operator);
            }
            if let Some(poll) = rest.strip_suffix("/results/stream") {
                let last = req
                    .headers()
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                return self.stream(poll.to_string(), last, operator);
            }
            return self.counted(
                "other",
                error(StatusCode::NOT_FOUND, "not_found", "no such path"),
            );
        }
        match (req.method(), path) {
            (&Method::GET, "/v1/polls") => self.counted("polls", self.poll_list()),
            (&Method::GET, "/") => self.counted(
                "page",
                web::text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    crate::page::PAGE,
                ),
            ),
            (&Method::GET, "/healthz") => {
                json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => web::render_metrics(),
            (_, "/" | "/v1/polls" | "/healthz" | "/readyz" | "/metrics") => method_not_allowed(),
            _ => self.counted(
                "other",
                error(StatusCode::NOT_FOUND, "not_found", "no such path"),
            ),
        }
    }
}

fn method_not_allowed() -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "use GET",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    resp
}

impl Reader {
    fn counted(&self, route: &'static str, resp: Response<Body>) -> Response<Body> {
        self.metrics.request(route, resp.status());
        resp
    }

    /// Does the request carry the operator's bearer token? Compared in constant time.
    fn is_operator(&self, headers: &hyper::HeaderMap) -> bool {
        let (Some(token), Some(given)) = (
            self.operator_token.as_deref(),
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ")),
        ) else {
            return false;
        };
        token.len() == given.len()
            && token
                .bytes()
                .zip(given.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    fn results(&self, poll: &str, operator: bool) -> Response<Body> {
        let snap = self.snapshots.borrow().clone();
        if snap.refreshed.is_none() {
            return self.counted("results", unavailable());
        }
        match snap.polls.get(poll) {
            Some(view) if view.hidden && !operator => self.counted("results", hidden()),
            Some(view) => {
                self.metrics.results_ok.increment(1);
                let mut resp = web::text(StatusCode::OK, "application/json", view.json.clone());
                resp.headers_mut().insert(
                    header::ETAG,
                    HeaderValue::from_str(&format!("\"{}\"", view.etag)).expect("hex"),
                );
                resp
            }
            None => self.counted(
                "results",
                error(StatusCode::NOT_FOUND, "unknown_poll", "no such poll"),
            ),
        }
    }

    fn poll_list(&self) -> Response<Body> {
        let snap = self.snapshots.borrow().clone();
        if snap.refreshed.is_none() {
            return unavailable();
        }
        web::text(StatusCode::OK, "application/json", snap.poll_list.clone())
    }

    fn readyz(&self) -> Response<Body> {
        let snap = self.snapshots.borrow().clone();
        let fresh = snap.refreshed.is_some_and(|t| t.elapsed() < STALE_AFTER);
        let status = if fresh {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(status, &serde_json::json!({"ready": fresh}))
    }

    /// One event per change of this poll's counts, a heartbeat comment in between. Resumes from
    /// `Last-Event-ID`: the current counts are sent at once unless that id already shows them.
    fn stream(
        &self,
        poll: String,
        last_event_id: Option<String>,
        operator: bool,
    ) -> Response<Body> {
        let snap = self.snapshots.borrow().clone();
        match snap.polls.get(&poll) {
            None if snap.refreshed.is_some() => {
                return self.counted(
                    "stream",
                    error(StatusCode::NOT_FOUND, "unknown_poll", "no such poll"),
                )
            }
            Some(view) if view.hidden && !operator => return self.counted("stream", hidden()),
            _ => {}
        }
        self.metrics.request("stream", StatusCode::OK);
        struct Subscriber {
            gauge: Gauge,
        }
        impl Drop for Subscriber {
            fn drop(&mut self) {
                self.gauge.decrement(1.0);
            }
        }
        self.metrics.subscribers.increment(1.0);
        let state = State {
            rx: self.snapshots.clone(),
            stop: self.stop.clone(),
            poll,
            last: last_event_id,
            heartbeat: self.heartbeat,
            operator,
            preamble: true,
            _subscriber: Subscriber {
                gauge: self.metrics.subscribers.clone(),
            },
        };
        struct State<S> {
            rx: watch::Receiver<Arc<Snapshot>>,
            stop: watch::Receiver<bool>,
            poll: String,
            last: Option<String>,
            heartbeat: Duration,
            operator: bool,
            preamble: bool,
            _subscriber: S,
        }
        let events = futures_util::stream::unfold(state, |mut st| async move {
            if st.preamble {
                st.preamble = false;
                return Some((Bytes::from_static(b"retry: 1000\n\n"), st));
            }
            loop {
                if *st.stop.borrow() {
                    return None;
                }
                let snap = st.rx.borrow_and_update().clone();
                if let Some(view) = snap.polls.get(&st.poll) {
                    if view.hidden && !st.operator {
                        // Hidden again while streaming (it cannot be, once revealed): stop.
                        return None;
                    }
                    if st.last.as_deref() != Some(view.etag.as_str()) {
                        st.last = Some(view.etag.clone());
                        let kind: &[u8] = if view.state == model::PollState::Final {
                            b"final"
                        } else {
                            b"results"
                        };
                        let mut event = Vec::with_capacity(view.json.len() + 48);
                        event.extend_from_slice(b"id: ");
                        event.extend_from_slice(view.etag.as_bytes());
                        event.extend_from_slice(b"\nevent: ");
                        event.extend_from_slice(kind);
                        event.extend_from_slice(b"\ndata: ");
                        event.extend_from_slice(&view.json);
                        event.extend_from_slice(b"\n\n");
                        return Some((Bytes::from(event), st));
                    }
                }
                tokio::select! {
                    changed = st.rx.changed() => if changed.is_err() { return None },
                    _ = tokio::time::sleep(st.heartbeat) => return Some((Bytes::from_static(b": heartbeat\n\n"), st)),
                    _ = st.stop.changed() => return None,
                }
            }
        });
        let body = Body::stream(StreamBody::new(
            events.map(|b| Ok::<_, Infallible>(Frame::data(b))),
        ));
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        resp
    }
}

fn hidden() -> Response<Body> {
    error(
        StatusCode::FORBIDDEN,
        "results_hidden",
        "this poll's results are kept until they are revealed",
    )
}

fn unavailable() -> Response<Body> {
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "no results source has answered yet",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}
