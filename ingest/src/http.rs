//! Ingest's HTTP surface: routing, the vote pipeline (validate -> stamp -> shard -> store -> 202),
//! and every refusal as `{"error":{"code","message"}}`.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use model::{Clock, RegionName, Rejection, VoteId, VoterId};
use web::{error, json, Body};

use crate::auth::{AuthError, Verifier};
use crate::identity::{self, AnonymousVoters, Client, TrustedProxies};
use crate::limit::{Bucket, Limiter};
use crate::request;
use crate::shards::{Shards, StoreError};
use db::CatalogCache;

/// The cookie holding a voter's id when there is no token or header.
pub const VOTER_COOKIE: &str = "voter_id";
/// The voter's id when there is no token; a `HeaderName`, so the lookup skips parsing a name.
const VOTER_HEADER: HeaderName = HeaderName::from_static("x-voter-id");
/// The cookie the vote page uses to show the voter's current choice.
const CHOICE_COOKIE: &str = "tally_choice";
const COOKIE_MAX_AGE_SECS: u64 = 60 * 60 * 24 * 365;

pub struct Ingest {
    pub(crate) region: RegionName,
    pub(crate) catalog: Arc<CatalogCache>,
    pub(crate) shards: Shards,
    pub(crate) clock: Clock,
    /// The drills' skew of `clock` (see `Config::drill_clock_skew_ms`), in microseconds.
    pub(crate) skew_us: i64,
    pub(crate) catalog_max_age: Duration,
    pub(crate) max_clock_offset_us: i64,
    pub(crate) voter_limit: Option<Limiter>,
    pub(crate) ip_limit: Option<Limiter>,
    pub(crate) voters: Voters,
    pub(crate) trusted_proxies: TrustedProxies,
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) secure_cookies: bool,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) metrics: IngestMetrics,
}

/// How this ingest knows its voters.
pub(crate) enum Voters {
    Jwt(Arc<Verifier>),
    Anonymous(AnonymousVoters),
}

/// Handles registered once, so the hot path does not build label sets per request. Accepted
/// votes are counted by their shard's writer, a batch at a time.
pub(crate) struct IngestMetrics {
    /// Recorded for every vote, so counted in place (see [`web::LatencyHistogram`]).
    ack_seconds: web::LatencyHistogram,
    region: String,
}

impl IngestMetrics {
    pub(crate) fn new(region: &RegionName) -> Self {
        let r = region.to_string();
        Self {
            ack_seconds: web::LatencyHistogram::new("tally_ingest_ack_seconds", &[("region", &r)]),
            region: r,
        }
    }

    fn rejected(&self, reason: &'static str) {
        metrics::counter!("tally_ingest_votes_total", "region" => self.region.clone(), "outcome" => reason).increment(1);
    }
}

/// A refusal: the status, the code in the JSON body, and the message.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    fn into_response(self) -> Response<Body> {
        let mut resp = error(self.status, self.code, self.message);
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::UnknownPoll => {
                Refusal::new(StatusCode::NOT_FOUND, "unknown_poll", r.to_string())
            }
            Rejection::PollClosed => {
                Refusal::new(StatusCode::CONFLICT, "poll_closed", r.to_string())
            }
            Rejection::PollNotOpen => {
                Refusal::new(StatusCode::CONFLICT, "poll_not_open", r.to_string())
            }
            Rejection::UnknownOption => Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_option",
                r.to_string(),
            ),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{e}; the vote was not recorded, retry"),
        )
        .retry(Duration::from_secs(1))
    }
}

impl From<request::DecodeError> for Refusal {
    fn from(e: request::DecodeError) -> Self {
        match e {
            request::DecodeError::ContentType(_) => Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                e.to_string(),
            ),
            request::DecodeError::Malformed(_) => {
                Refusal::new(StatusCode::BAD_REQUEST, "malformed", e.to_string())
            }
        }
    }
}

impl web::Service for Ingest {
    /// Every vote waits for its shard's write; a voter that half-closes after sending still
    /// learns whether it was stored.
    const ANSWERS_AFTER_HALF_CLOSE: bool = true;

    async fn call(&self, req: Request<Incoming>, conn: &web::Connection) -> Response<Body> {
        // Split first, so the path borrows from the parts instead of a copy of the URI.
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        if let Some(poll) = crate::request::vote_route(path) {
            if parts.method != Method::POST {
                return method_not_allowed("POST");
            }
            return self.api_vote(&parts, body, conn, poll).await;
        }
        match (&parts.method, path) {
            (&Method::GET, "/healthz") => {
                json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => web::render_metrics(),
            (&Method::GET, "/") => self.page(&parts.headers, None),
            (&Method::POST, "/") => self.form_vote(&parts, body, conn).await,
            (_, "/healthz" | "/readyz" | "/metrics") => method_not_allowed("GET"),
            (_, "/") => method_not_allowed("GET, POST"),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("use {allow}"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

impl Ingest {
    fn readyz(&self) -> Response<Body> {
        let down: Vec<u32> = self
            .shards
            .iter()
            .filter(|s| !s.is_up())
            .map(|s| s.index())
            .collect();
        let catalog = self.catalog.is_loaded();
        let keys = match &self.voters {
            Voters::Jwt(verifier) => verifier.is_loaded(),
            Voters::Anonymous(_) => true,
        };
        let rules = self.rules_hold(Instant::now());
        let status = if down.is_empty() && catalog && keys && rules.is_ok() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(
            status,
            &serde_json::json!({
                "ready": status == StatusCode::OK,
                "catalog_loaded": catalog,
                "keys_loaded": keys,
                "shards_down": down,
                "refusing_votes": rules.err().map(|r| r.message),
            }),
        )
    }

    async fn api_vote(
        &self,
        parts: &Parts,
        body: Incoming,
        conn: &web::Connection,
        poll: &str,
    ) -> Response<Body> {
        let started = Instant::now();
        match self
            .take_vote(
                parts,
                body,
                conn,
                poll,
                "application/json",
                request::json_vote,
                |_| (),
                started,
            )
            .await
        {
            Ok((id, (), new_cookie)) => {
                self.metrics.ack_seconds.record(started.elapsed());
                let mut body = Vec::with_capacity(50);
                body.extend_from_slice(b"{\"vote_id\":\"");
                body.extend_from_slice(&id.to_uuid_text());
                body.extend_from_slice(b"\"}");
                let mut resp = web::text(StatusCode::ACCEPTED, "application/json", body);
                if let Some(c) = new_cookie {
                    resp.headers_mut().append(header::SET_COOKIE, c);
                }
                resp
            }
            Err(r) => {
                self.metrics.rejected(r.code);
                r.into_response()
            }
        }
    }

    /// The original app's form post: `vote=a` for the default poll, answered with the page.
    async fn form_vote(
        &self,
        parts: &Parts,
        body: Incoming,
        conn: &web::Connection,
    ) -> Response<Body> {
        let started = Instant::now();
        let form = "application/x-www-form-urlencoded";
        match self
            .take_vote(
                parts,
                body,
                conn,
                model::DEFAULT_POLL,
                form,
                request::form_vote,
                str::to_string,
                started,
            )
            .await
        {
            Ok((_, option, new_cookie)) => {
                let mut resp = self.page(&parts.headers, Some(&option));
                if let Some(c) = new_cookie {
                    resp.headers_mut().append(header::SET_COOKIE, c);
                }
                let secure = if self.secure_cookies { "; Secure" } else { "" };
                let choice = format!(
                    "{CHOICE_COOKIE}={option}; Path=/; Max-Age={COOKIE_MAX_AGE_SECS}; SameSite=Lax{secure}"
                );
                resp.headers_mut().append(
                    header::SET_COOKIE,
                    HeaderValue::from_str(&choice).expect("option ids are header-safe"),
                );
                resp
            }
            Err(r) => {
                self.metrics.rejected(r.code);
                r.into_response()
            }
        }
    }

    /// What every vote goes through before it is answered, whichever route it came by: the address
    /// limit, the voter, the content type, the body, its decoding, and [`Ingest::record`]. Returns
    /// the stored vote's id, what `keep` takes from its option (which borrows from the body, so
    /// a route that does not need it copies nothing), and a `Set-Cookie` for a newly issued voter
    /// id.
    /// `started` is when the request came in; the clock is read once more, once its body is in,
    /// and those two readings serve every check (a clock read is dear on a vote's path).
    #[allow(clippy::too_many_arguments)]
    async fn take_vote<T>(
        &self,
        parts: &Parts,
        body: Incoming,
        conn: &web::Connection,
        poll: &str,
        content_type: &'static str,
        decode: fn(&[u8]) -> Result<Cow<'_, str>, request::DecodeError>,
        keep: impl FnOnce(&str) -> T,
        started: Instant,
    ) -> Result<(VoteId, T, Option<HeaderValue>), Refusal> {
        if identity::cross_site(&parts.headers, &self.allowed_origins) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                "votes are taken only from this site's own pages",
            ));
        }
        let client = identity::client(conn.peer(), &parts.headers, &self.trusted_proxies);
        self.check_ip(client.ip, started)?;
        let (voter, new_cookie) = self.voter(&parts.headers, client).await?;
        // Located now, the voter's bucket loads from memory while the body is read and decoded.
        let bucket = self
            .voter_limit
            .as_ref()
            .map(|limit| limit.locate(voter.as_bytes()));
        if !request::content_type_is(
            parts
                .headers
                .get(header::CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            content_type,
        ) {
            return Err(request::DecodeError::ContentType(content_type).into());
        }
        let body = self.read_body(body).await?;
        let read = Instant::now();
        let option = decode(&body)?;
        let id = self
            .record(poll, &option, &voter, bucket, conn, read)
            .await?;
        Ok((id, keep(&option), new_cookie))
    }

    fn page(&self, headers: &HeaderMap, just_voted: Option<&str>) -> Response<Body> {
        let catalog = self.catalog.load();
        let Some(poll) = catalog.get(model::DEFAULT_POLL) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the poll catalog is not loaded yet",
            );
        };
        let choice = just_voted
            .map(str::to_string)
            .or_else(|| cookie(headers, CHOICE_COOKIE).map(str::to_string));
        let choice = choice.filter(|c| poll.has_option(c));
        web::text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::page::render(poll, choice.as_deref()),
        )
    }

    fn check_ip(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if let Some(limit) = &self.ip_limit {
            // An IPv4 address as its IPv6-mapped form: one key whichever way it arrived.
            let key = match ip {
                std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(ip) => ip.octets(),
            };
            limit.check(&key, now).map_err(|wait| {
                Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many votes from this address",
                )
                .retry(wait)
            })?;
        }
        Ok(())
    }

    /// Who is voting, validated: the token's `sub` with JWT voters; with anonymous ones a trusted
    /// gateway's `X-Voter-Id`, else the id in a cookie this deployment signed, else a new id
    /// (returned with the `Set-Cookie` to send). `X-Voter-Id` from anyone but a trusted proxy is
    /// refused: a client does not get to say who it is. Borrowed from the headers where possible:
    /// this is on every vote's path.
    async fn voter<'h>(
        &self,
        headers: &'h HeaderMap,
        client: Client,
    ) -> Result<(Cow<'h, str>, Option<HeaderValue>), Refusal> {
        let header = headers.get(VOTER_HEADER);
        if header.is_some() && !client.via_trusted_proxy {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "untrusted_voter_header",
                "X-Voter-Id is taken only from trusted proxies",
            ));
        }
        let voters = match &self.voters {
            Voters::Jwt(verifier) => {
                let value = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                return match verifier.voter(value).await {
                    Ok(v) => Ok((Cow::Owned(String::from(v)), None)),
                    Err(AuthError::NoKeys) => Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "the identity provider's keys are not loaded yet; the vote was not recorded, retry",
                    )
                    .retry(Duration::from_secs(1))),
                    Err(e) => Err(Refusal::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        e.to_string(),
                    )),
                };
            }
            Voters::Anonymous(voters) => voters,
        };
        let checked = |s: &'h str| {
            VoterId::validate(s)
                .map(|()| (Cow::Borrowed(s), None))
                .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad_voter", e.to_string()))
        };
        if let Some(h) = header {
            return checked(h.to_str().map_err(|_| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "bad_voter",
                    "X-Voter-Id is not ASCII",
                )
            })?);
        }
        // A cookie this deployment did not sign (forged, altered, another's) is not trusted:
        // its holder is a new voter.
        if let Some(id) = cookie(headers, VOTER_COOKIE).and_then(|c| voters.verify(c)) {
            return checked(id);
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let set = identity::voter_cookie(
            VOTER_COOKIE,
            &voters.sign(&id),
            COOKIE_MAX_AGE_SECS,
            self.secure_cookies,
        );
        Ok((Cow::Owned(id), Some(set)))
    }

    async fn read_body(&self, body: Incoming) -> Result<Bytes, Refusal> {
        web::read_body(body, self.body_limit, self.body_timeout)
            .await
            .map_err(|e| match e {
                web::BodyError::TooLarge(_) => {
                    Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string())
                }
                web::BodyError::Timeout(_) => {
                    Refusal::new(StatusCode::REQUEST_TIMEOUT, "timeout", e.to_string())
                }
                web::BodyError::Read(_) => {
                    Refusal::new(StatusCode::BAD_REQUEST, "malformed", e.to_string())
                }
            })
    }

    /// Validates against the catalog, applies the voter limit, stamps, and stores on the voter's
    /// shard. `voter` is a validated voter id, `bucket` its rate-limit bucket when the voter limit
    /// is on; `read` is when the vote's body was read, the instant its limit and its store's
    /// deadline count from. The vote's connection is enlisted as a voter's, one the group commit
    /// may linger for (see [`web::Enlisted`]).
    async fn record(
        &self,
        poll: &str,
        option: &str,
        voter: &str,
        bucket: Option<Bucket<'_>>,
        conn: &web::Connection,
        read: Instant,
    ) -> Result<VoteId, Refusal> {
        self.rules_hold(read)?;
        // Checked against the catalog, `poll` and `option` are valid ids too.
        let window = self.catalog.load().check(poll, option)?.window;
        let cast_at = self.clock.stamp();
        // Judged by the vote's own stamp, so a close scheduled ahead is exact in every region,
        // whenever each last read its catalog. Before the limit: a refused vote costs no token.
        window.admits(cast_at)?;
        if let Some(bucket) = bucket {
            bucket.take(read).map_err(|wait| {
                Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many votes from this voter",
                )
                .retry(wait)
            })?;
        }
        let id = VoteId::generate(cast_at.0);
        let fields = model::wire::Fields {
            id,
            cast_at,
            poll,
            option,
            voter,
            region: self.region.as_str(),
        };
        let shard = model::shard_of(poll, voter, self.shards.count());
        conn.enlist();
        self.shards.get(shard).store(&fields, read.into()).await?;
        Ok(id)
    }
}

impl Ingest {
    /// Whether the rules a vote is judged by can be trusted now: a catalog read recently enough
    /// (a close may have been scheduled since) and a clock close enough to the database's (a
    /// vote's stamp says whether it came before the close).
    fn rules_hold(&self, now: Instant) -> Result<(), Refusal> {
        let refuse = |why: String| {
            Err(
                Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)
                    .retry(Duration::from_secs(1)),
            )
        };
        match self.catalog.age_at(now) {
            Some(age) if age > self.catalog_max_age => {
                return refuse(format!(
                    "the poll catalog was last read {:.1} s ago; the vote was not recorded, retry",
                    age.as_secs_f64()
                ))
            }
            _ => {}
        }
        if let Some(off) = self.clock_offset_us() {
            if off.abs() > self.max_clock_offset_us {
                return refuse(format!(
                    "this ingest's clock is {:.0} ms off the database's; the vote was not recorded, retry",
                    off as f64 / 1000.0
                ));
            }
        }
        Ok(())
    }

    /// How far the clock that stamps votes is from the database's, in microseconds.
    fn clock_offset_us(&self) -> Option<i64> {
        self.catalog
            .clock_offset_us()
            .map(|db_less_host| self.skew_us - db_less_host)
    }
}

/// Exports the catalog's age and the clock's offset, and says in the log when ingest starts or
/// stops refusing votes because of them, until the server is gone.
pub(crate) async fn watch_rules(ingest: std::sync::Weak<Ingest>) {
    let mut refusing = false;
    loop {
        let Some(i) = ingest.upgrade() else { return };
        let region = i.region.to_string();
        let now = Instant::now();
        if let Some(age) = i.catalog.age_at(now) {
            metrics::gauge!("tally_ingest_catalog_age_seconds", "region" => region.clone())
                .set(age.as_secs_f64());
        }
        if let Some(off) = i.clock_offset_us() {
            metrics::gauge!("tally_ingest_clock_offset_seconds", "region" => region.clone())
                .set(off as f64 / 1e6);
        }
        match i.rules_hold(now) {
            Err(r) if !refusing => {
                tracing::warn!(reason = %r.message, "refusing votes");
                refusing = true;
            }
            Ok(()) if refusing => {
                tracing::info!("taking votes again");
                refusing = false;
            }
            _ => {}
        }
        metrics::gauge!("tally_ingest_refusing_votes", "region" => region).set(if refusing {
            1.0
        } else {
            0.0
        });
        drop(i);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_parsed_without_surprises() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; voter_id=abc; b=2"),
        );
        assert_eq!(cookie(&h, "voter_id"), Some("abc"));
        assert_eq!(cookie(&h, "voter"), None);
    }
}
