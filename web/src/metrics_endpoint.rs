//! One Prometheus recorder per process; every role renders it, and any
//! [`LatencyHistogram`](crate::LatencyHistogram), on `GET /metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use hyper::{Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::histogram::SECONDS_BUCKETS;
use crate::{text, Body};

/// Buckets for batch sizes (`_size` histograms).
const SIZE_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
];

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Installs the process-wide recorder on first use, with its upkeep. Tests run several roles in
/// one process and share it.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
            .expect("static bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (a test harness); ours then renders empty.
        let _ = metrics::set_global_recorder(recorder);
        spawn_upkeep(handle.clone(), UPKEEP_EVERY);
        handle
    })
}

/// A recorder built with `build_recorder` keeps every histogram sample until a scrape renders
/// it: an ingest nobody scrapes would hold about 16 bytes per vote forever. This thread folds the
/// samples in on its own, whatever the scrape interval, and lives as long as the process.
pub fn spawn_upkeep(handle: PrometheusHandle, every: Duration) {
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            handle.run_upkeep();
        })
        .expect("spawning the metrics upkeep thread");
}

pub fn render_metrics() -> Response<Body> {
    let mut out = metrics_handle().render();
    crate::histogram::render(&mut out);
    text(StatusCode::OK, "text/plain; version=0.0.4", out)
}
