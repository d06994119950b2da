//! Measuring Tally: an HTTP load generator, bare-hyper baselines, and the component benchmarks
//! behind `tally bench`. Every benchmark runs Tally beside its baseline in one run, on the same
//! machine and load, and reports the ratio; absolute figures on a shared machine mean little.
#![forbid(unsafe_code)]

pub mod aggregator_bench;
pub mod bare;
pub mod cpu;
pub mod gate;
pub mod ingest_bench;
pub mod load;
pub mod original;
pub mod reader_bench;
pub mod schedule;

use serde::Serialize;

/// One component benchmark's result, printed as the contract's last line.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub role: String,
    pub rate: f64,
    pub baseline: String,
    pub baseline_rate: f64,
    pub ratio: f64,
    /// What else was measured (latency percentiles, counts, checks).
    pub details: serde_json::Value,
}

impl Comparison {
    pub fn new(
        role: &str,
        rate: f64,
        baseline: &str,
        baseline_rate: f64,
        details: serde_json::Value,
    ) -> Self {
        Self {
            role: role.into(),
            rate,
            baseline: baseline.into(),
            baseline_rate,
            ratio: if baseline_rate > 0.0 {
                rate / baseline_rate
            } else {
                0.0
            },
            details,
        }
    }

    /// From alternating rounds: the mean rates, and as the ratio the median of the round pairs'
    /// ratios (each pair's ratio is in `details.pair_ratios`).
    pub fn alternated(
        role: &str,
        baseline: &str,
        rounds: &load::Alternation,
        mut details: serde_json::Value,
    ) -> Self {
        if let Some(map) = details.as_object_mut() {
            map.insert(
                "pair_ratios".into(),
                serde_json::json!(rounds.pair_ratios()),
            );
            map.insert(
                "cpu_us_per_answer".into(),
                serde_json::json!(rounds.tally_cpu_per_answer()),
            );
            map.insert(
                "baseline_cpu_us_per_answer".into(),
                serde_json::json!(rounds.baseline_cpu_per_answer()),
            );
            map.insert("cpu_ratio".into(), serde_json::json!(rounds.cpu_ratio()));
        }
        Self {
            role: role.into(),
            rate: rounds.tally_rate(),
            baseline: baseline.into(),
            baseline_rate: rounds.baseline_rate(),
            ratio: rounds.ratio(),
            details,
        }
    }

    /// `<role>: <rate>/s vs <baseline>: <rate>/s = <ratio>x`
    pub fn line(&self) -> String {
        format!(
            "{}: {:.0}/s vs {}: {:.0}/s = {:.2}x",
            self.role, self.rate, self.baseline, self.baseline_rate, self.ratio
        )
    }
}

/// A runtime for a server under test, on its own threads, so the load generator's work is not
/// scheduled on the server's workers.
pub fn server_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("server")
        .enable_all()
        .build()
}

/// A runtime for the load generator and a bench's set-up. Its threads keep tokio's own name,
/// which `scripts/profile-ingest` reads as the generator's.
pub fn client_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

/// Runs a bench's `work` on `rt` until it ends or SIGINT/SIGTERM comes. On a signal `work` is
/// dropped, and with it the PostgreSQL and Redis servers it started, which would otherwise
/// outlive an interrupted bench on their ports and in their directories.
pub fn until_interrupted<T>(
    rt: &tokio::runtime::Runtime,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    rt.block_on(async {
        tokio::select! {
            // The signal first: its handlers are in place before any server starts.
            biased;
            () = web::shutdown_signal() => anyhow::bail!("interrupted"),
            done = work => done,
        }
    })
}

/// Connections a bench listener queues for `accept`, as `tally`'s own listeners do (tokio's
/// `bind`). std's `bind` queues 128: the load generator's 256 connections, opening at once,
/// overflowed it, and the kernel resends a dropped SYN only after a second, which took up to a
/// third of a 3 s round from some connections and put a 1 s answer into an open loop's p99.
pub const LISTEN_BACKLOG: i32 = 1024;

/// A listener on a free loopback port, to be handed to a task on another runtime (which turns it
/// into a tokio listener there, on its own reactor).
pub fn loopback_listener() -> std::io::Result<(std::net::TcpListener, std::net::SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    let l = std::net::TcpListener::from(socket);
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// Converts a listener from [`loopback_listener`] on the runtime this runs on.
pub fn tokio_listener(l: std::net::TcpListener) -> tokio::net::TcpListener {
    tokio::net::TcpListener::from_std(l).expect("a non-blocking loopback listener")
}
