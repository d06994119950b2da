//! The HTTP load generator. Closed loop (each connection sends its next request when the last
//! one is answered: the most a server can take) for component benchmarks; open loop (requests
//! at a fixed rate, latency measured from when each was due, so a slow server cannot slow the
//! clock and hide its latency) for `tally load`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::cpu::{CpuMeter, CpuTime, PerAnswer};
pub use crate::schedule::{Schedule, Shape};

/// Builds the `n`th request.
pub type MakeRequest = Arc<dyn Fn(u64) -> Request<Full<Bytes>> + Send + Sync>;

/// Where requests go: an address, and over HTTPS the server name to check and the trust to
/// check it under (none: HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<(Arc<str>, tls::ClientTrust)>,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, tls: None }
    }
}

/// Where the next request goes: fixed for a benchmark or a remote target; for `tally load` on
/// the local stack, wherever Route53's answer sends the voters now (a connection is replaced
/// when the answer changes).
pub type Route = Arc<dyn Fn() -> Endpoint + Send + Sync>;

/// A route that never changes.
pub fn fixed(endpoint: impl Into<Endpoint>) -> Route {
    let endpoint = endpoint.into();
    Arc::new(move || endpoint.clone())
}

/// Sees the `n`th request's answer: its sample and body.
pub type OnAnswer = Arc<dyn Fn(u64, Sample, &[u8]) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Outcome {
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that failed below HTTP (connect, reset).
    pub transport_errors: u64,
    pub elapsed: Duration,
    /// Microseconds.
    pub latency: Histogram<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub rate: f64,
    pub ok_rate: f64,
    pub statuses: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Outcome {
    fn new() -> Self {
        Self {
            statuses: BTreeMap::new(),
            transport_errors: 0,
            elapsed: Duration::ZERO,
            latency: histogram(),
        }
    }

    /// Adds `other`'s answers (its time is the caller's to combine).
    pub fn merge(&mut self, other: &Outcome) {
        for (s, n) in &other.statuses {
            *self.statuses.entry(*s).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.latency.add(&other.latency).expect("same bounds");
    }

    pub fn requests(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.transport_errors
    }

    /// Answers with a 2xx status.
    pub fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn summary(&self) -> Summary {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        Summary {
            requests: self.requests(),
            rate: self.requests() as f64 / secs,
            ok_rate: self.ok() as f64 / secs,
            statuses: self.statuses.clone(),
            transport_errors: self.transport_errors,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.latency.max() as f64 / 1000.0,
        }
    }
}

/// Loads that ran side by side, as one: their answers added, the longest one's time.
pub fn side_by_side(outcomes: impl IntoIterator<Item = Outcome>) -> Option<Outcome> {
    outcomes.into_iter().reduce(|mut total, o| {
        total.merge(&o);
        total.elapsed = total.elapsed.max(o.elapsed);
        total
    })
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 keep-alive connection to `endpoint`, over TLS if it names a server.
pub async fn connect(endpoint: impl Into<Endpoint>) -> anyhow::Result<Sender> {
    let endpoint = endpoint.into();
    let stream = TcpStream::connect(endpoint.addr).await?;
    stream.set_nodelay(true)?;
    match &endpoint.tls {
        None => handshake(stream).await,
        Some((name, trust)) => handshake(trust.connect(stream, name).await?).await,
    }
}

async fn handshake<S>(stream: S) -> anyhow::Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request; returns its status, or `None` if the connection failed.
async fn send(sender: &mut Sender, req: Request<Full<Bytes>>) -> Option<u16> {
    if sender.ready().await.is_err() {
        return None;
    }
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some(status)
}

/// `connections` keep-alive connections, each sending back to back for `duration`.
pub async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + duration;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let make = make.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut out = Outcome::new();
                let mut sender = None;
                while Instant::now() < deadline {
                    if sender.is_none() {
                        sender = connect(addr).await.ok();
                        if sender.is_none() {
                            out.transport_errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let sent = Instant::now();
                    match send(sender.as_mut().expect("connected"), make(n)).await {
                        Some(status) => {
                            *out.statuses.entry(status).or_default() += 1;
                            let _ = out.latency.record(sent.elapsed().as_micros().max(1) as u64);
                        }
                        None => {
                            out.transport_errors += 1;
                            sender = None;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Outcome::new();
    for t in tasks {
        if let Ok(o) = t.await {
            total.merge(&o);
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// Round pairs [`alternate`] runs unless told otherwise: enough that one disturbed round does not
/// decide the median.
pub const DEFAULT_PAIRS: usize = 5;

/// Baseline and Tally measured in alternating rounds under the same load: what each round pair
/// measured, and Tally's last round.
pub struct Alternation {
    /// Successful answers per second, one per round.
    pub baseline: Vec<f64>,
    pub tally: Vec<f64>,
    pub last: Outcome,
    /// CPU spent over all of each side's rounds, and the successful answers it bought.
    pub baseline_cpu: (CpuTime, u64),
    pub tally_cpu: (CpuTime, u64),
}

impl Alternation {
    pub fn baseline_rate(&self) -> f64 {
        mean(&self.baseline)
    }

    pub fn tally_rate(&self) -> f64 {
        mean(&self.tally)
    }

    /// Each pair's Tally rate over its baseline rate. A pair runs back to back, so drift on a
    /// shared machine between pairs cancels out of each ratio.
    pub fn pair_ratios(&self) -> Vec<f64> {
        self.tally
            .iter()
            .zip(&self.baseline)
            .map(|(t, b)| if *b > 0.0 { t / b } else { 0.0 })
            .collect()
    }

    pub fn baseline_cpu_per_answer(&self) -> PerAnswer {
        self.baseline_cpu.0.per(self.baseline_cpu.1)
    }

    pub fn tally_cpu_per_answer(&self) -> PerAnswer {
        self.tally_cpu.0.per(self.tally_cpu.1)
    }

    /// The baseline's CPU per answer over Tally's: the rate ratio two saturated cores would give
    /// if CPU were all that limited either side. Steadier than [`Alternation::ratio`], which
    /// also moves with the machine's speed from round to round.
    pub fn cpu_ratio(&self) -> f64 {
        let tally = self.tally_cpu_per_answer().total;
        if tally > 0.0 {
            self.baseline_cpu_per_answer().total / tally
        } else {
            0.0
        }
    }

    /// The median pair ratio: one noisy round moves it less than it moves the ratio of means.
    pub fn ratio(&self) -> f64 {
        median(&self.pair_ratios())
    }
}

/// The middle value (the mean of the middle two for an even count); 0 for none.
pub fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// `pairs` rounds of each, after a warm-up of each, with `meter` reading the CPU each round
/// spent. The order within a pair alternates too, so neither side always runs on the warmer (or
/// more loaded) half of a pair.
pub async fn alternate(
    baseline: SocketAddr,
    tally: SocketAddr,
    connections: usize,
    round: Duration,
    pairs: usize,
    make: MakeRequest,
    meter: &CpuMeter,
) -> Alternation {
    closed_loop(baseline, connections, Duration::from_secs(1), make.clone()).await;
    closed_loop(tally, connections, Duration::from_secs(1), make.clone()).await;
    let rate = |o: &Outcome| o.ok() as f64 / o.elapsed.as_secs_f64();
    let mut result = Alternation {
        baseline: Vec::with_capacity(pairs),
        tally: Vec::with_capacity(pairs),
        last: Outcome::new(),
        baseline_cpu: Default::default(),
        tally_cpu: Default::default(),
    };
    let measured = |addr: SocketAddr| {
        let make = make.clone();
        async move {
            let before = meter.read();
            let outcome = closed_loop(addr, connections, round, make).await;
            (meter.read().since(&before), outcome)
        }
    };
    for pair in 0..pairs.max(1) {
        let baseline_first = pair % 2 == 0;
        for is_baseline in [baseline_first, !baseline_first] {
            let (spent, o) = measured(if is_baseline { baseline } else { tally }).await;
            let (rates, cpu) = if is_baseline {
                (&mut result.baseline, &mut result.baseline_cpu)
            } else {
                (&mut result.tally, &mut result.tally_cpu)
            };
            rates.push(rate(&o));
            cpu.0.add(&spent);
            cpu.1 += o.ok();
            if !is_baseline {
                result.last = o;
            }
        }
    }
    result
}

/// What one open-loop request did, for reports over time.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the load started, when the request was due.
    pub due: f64,
    pub status: Option<u16>,
    /// From when it was due to when it was answered: includes any wait for a free connection.
    pub latency_us: u64,
}

/// The p99 latency in ms of the answered requests due in each `window` of an open loop, in order
/// (`None` for a window with no answer), from the same histogram and quantile as the loop's own
/// p99. It tells a missed latency target's causes apart: a p99 that climbs window after window is
/// a queue growing because the server fell behind the offered rate; one high window among low
/// ones is a stall.
pub fn window_p99_ms(samples: &[Sample], window: Duration) -> Vec<Option<f64>> {
    let width = window.as_secs_f64();
    let mut windows: Vec<Histogram<u64>> = Vec::new();
    for s in samples.iter().filter(|s| s.status.is_some()) {
        let i = (s.due / width) as usize;
        if windows.len() <= i {
            windows.resize_with(i + 1, histogram);
        }
        let _ = windows[i].record(s.latency_us);
    }
    windows
        .iter()
        .map(|h| (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0))
        .collect()
}

/// Requests due by `schedule` over up to `connections` keep-alive connections.
/// Each connection, when free, claims the next request and sends it when it is due, so a slow
/// answer holds up only its own connection and no dispatcher sits between the clock and the
/// connections. `on_answer` sees each answered request (the load's own bookkeeping: acknowledged
/// vote ids).
pub async fn open_loop(
    route: Route,
    schedule: Schedule,
    connections: usize,
    make: MakeRequest,
    on_answer: OnAnswer,
) -> (Outcome, Vec<Sample>) {
    let start = Instant::now();
    let total = schedule.total;
    let schedule = Arc::new(schedule);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let next = next.clone();
            let make = make.clone();
            let on_answer = on_answer.clone();
            let route = route.clone();
            let schedule = schedule.clone();
            tokio::spawn(async move {
                let mut out = Outcome::new();
                let mut samples = Vec::new();
                let mut sender: Option<(Endpoint, Sender)> = None;
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let due = start + schedule.due(n);
                    tokio::time::sleep_until(due.into()).await;
                    let endpoint = route();
                    if sender.as_ref().is_none_or(|(e, _)| *e != endpoint) {
                        sender = connect(endpoint.clone()).await.ok().map(|s| (endpoint, s));
                    }
                    let mut status = None;
                    let mut body = Bytes::new();
                    if let Some((_, s)) = sender.as_mut() {
                        if s.ready().await.is_ok() {
                            if let Ok(resp) = s.send_request(make(n)).await {
                                status = Some(resp.status().as_u16());
                                body = resp
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                            }
                        }
                    }
                    let latency_us = due.elapsed().as_micros().max(1) as u64;
                    match status {
                        Some(st) => {
                            *out.statuses.entry(st).or_default() += 1;
                            let _ = out.latency.record(latency_us);
                        }
                        None => {
                            out.transport_errors += 1;
                            sender = None;
                        }
                    }
                    let sample = Sample {
                        due: due.duration_since(start).as_secs_f64(),
                        status,
                        latency_us,
                    };
                    on_answer(n, sample, &body);
                    samples.push(sample);
                }
                (out, samples)
            })
        })
        .collect();
    let mut outcome = Outcome::new();
    let mut samples = Vec::with_capacity(total as usize);
    for w in workers {
        if let Ok((o, s)) = w.await {
            outcome.merge(&o);
            samples.extend(s);
        }
    }
    outcome.elapsed = start.elapsed();
    samples.sort_by(|a, b| a.due.total_cmp(&b.due));
    (outcome, samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(baseline: &[f64], tally: &[f64]) -> Alternation {
        Alternation {
            baseline: baseline.to_vec(),
            tally: tally.to_vec(),
            last: Outcome::new(),
            baseline_cpu: Default::default(),
            tally_cpu: Default::default(),
        }
    }

    #[test]
    fn each_window_gets_the_p99_of_its_own_answers() {
        let sample = |due: f64, status: Option<u16>, latency_us: u64| Sample {
            due,
            status,
            latency_us,
        };
        // 100 answers in the first half second (10..=1,000 µs, which the histogram holds
        // exactly), none in the second, then a window whose one slow request went unanswered
        // and does not count.
        let mut samples: Vec<_> = (1..=100u64)
            .map(|i| sample(i as f64 / 1000.0, Some(202), i * 10))
            .collect();
        samples.push(sample(1.1, Some(503), 2_000));
        samples.push(sample(1.2, None, 9_000_000));
        let p99s = window_p99_ms(&samples, Duration::from_millis(500));
        assert_eq!(p99s, vec![Some(0.99), None, Some(2.0)]);
        assert!(window_p99_ms(&[], Duration::from_millis(500)).is_empty());
    }

    #[test]
    fn the_ratio_is_the_median_pair_not_the_ratio_of_means() {
        // One disturbed pair (the third) drags the ratio of means to 0.42; the median stays.
        let r = rounds(&[100.0, 100.0, 400.0], &[80.0, 70.0, 100.0]);
        assert_eq!(r.pair_ratios(), vec![0.8, 0.7, 0.25]);
        assert_eq!(r.ratio(), 0.7);
        assert!((r.tally_rate() / r.baseline_rate() - 0.4167).abs() < 1e-3);
        assert!((rounds(&[10.0, 10.0], &[6.0, 8.0]).ratio() - 0.7).abs() < 1e-9);
        assert_eq!(rounds(&[0.0], &[5.0]).ratio(), 0.0);
        assert_eq!(rounds(&[], &[]).ratio(), 0.0);
    }

    #[test]
    fn the_cpu_ratio_is_the_baseline_cpu_per_answer_over_tallys() {
        let ms = std::time::Duration::from_millis;
        let mut r = rounds(&[100.0], &[80.0]);
        assert_eq!(r.cpu_ratio(), 0.0, "nothing measured");
        r.baseline_cpu = (
            CpuTime {
                server: ms(300),
                load: ms(300),
                redis: ms(0),
            },
            60_000,
        );
        r.tally_cpu = (
            CpuTime {
                server: ms(400),
                load: ms(300),
                redis: ms(100),
            },
            50_000,
        );
        // 10 us an answer against 16.
        assert!((r.baseline_cpu_per_answer().total - 10.0).abs() < 1e-9);
        assert!((r.tally_cpu_per_answer().redis - 2.0).abs() < 1e-9);
        assert!((r.cpu_ratio() - 0.625).abs() < 1e-9);
    }
}
