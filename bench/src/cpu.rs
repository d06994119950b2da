//! Where a benchmark's CPU went, from the kernel's own accounting of each thread's time on a CPU
//! (`/proc/<pid>/task/<tid>/schedstat`, nanoseconds): the server under test (this process's
//! threads named [`SERVER_THREADS`], and the metrics upkeep a role starts), the load generator
//! (every other thread here) and the Redis servers the benchmark started.
//!
//! On a machine whose speed drifts from second to second, a rate is noisy; CPU time spent per
//! answered request is much steadier, and on two saturated cores it is what decides the rate.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// The name [`crate::server_runtime`] gives the threads of the server under test.
pub const SERVER_THREADS: &str = "server";
/// The thread `web` starts to fold the process's histogram samples: the server's work.
const UPKEEP_THREAD: &str = "metrics-upkeep";

/// CPU time, by who spent it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub server: Duration,
    pub load: Duration,
    pub redis: Duration,
}

impl CpuTime {
    /// What was spent between `earlier` and this reading.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            server: self.server.saturating_sub(earlier.server),
            load: self.load.saturating_sub(earlier.load),
            redis: self.redis.saturating_sub(earlier.redis),
        }
    }

    pub fn add(&mut self, other: &CpuTime) {
        self.server += other.server;
        self.load += other.load;
        self.redis += other.redis;
    }

    /// Microseconds per answer, for `answers` answers.
    pub fn per(&self, answers: u64) -> PerAnswer {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / answers.max(1) as f64;
        PerAnswer {
            server: us(self.server),
            redis: us(self.redis),
            load: us(self.load),
            total: us(self.server + self.redis + self.load),
        }
    }
}

/// Microseconds of CPU per answered request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PerAnswer {
    pub server: f64,
    pub redis: f64,
    pub load: f64,
    pub total: f64,
}

/// Reads the CPU time of this process's threads and of the given Redis servers.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    redis: Vec<u32>,
}

impl CpuMeter {
    pub fn new(redis_pids: Vec<u32>) -> Self {
        Self { redis: redis_pids }
    }

    /// Threads that ended since the last reading lose their time; the server's and generator's
    /// threads live as long as the benchmark. Where `/proc` is missing, everything reads zero.
    pub fn read(&self) -> CpuTime {
        let mut time = CpuTime::default();
        for (name, on_cpu) in threads(Path::new("/proc/self")) {
            if name.starts_with(SERVER_THREADS) || name == UPKEEP_THREAD {
                time.server += on_cpu;
            } else {
                time.load += on_cpu;
            }
        }
        for pid in &self.redis {
            // Redis's background threads (the append-only file's fsync) are its work too.
            for (_, on_cpu) in threads(Path::new(&format!("/proc/{pid}"))) {
                time.redis += on_cpu;
            }
        }
        time
    }
}

/// A process's time on a CPU, all its threads' together, those that have ended included: the
/// user and system time of `/proc/<pid>/stat`, in `USER_HZ` ticks (10 ms). Zero for a process
/// that is gone.
pub fn process_time(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name is in parentheses and may hold spaces: count fields after it.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
            Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
        })
        .unwrap_or_default()
}

/// How many times the live threads of a process were taken off a CPU because another was given
/// it (`nonvoluntary_ctxt_switches`): a busy machine's cost that the CPU time of a process shows
/// only as caches refilled after each.
pub fn preemptions(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Each live thread of a process: its name and its time on a CPU.
fn threads(process: &Path) -> Vec<(String, Duration)> {
    let Ok(tasks) = std::fs::read_dir(process.join("task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .map(|task| {
            let dir = task.path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            (name.trim_end().to_string(), on_cpu(&dir))
        })
        .collect()
}

/// A task's time on a CPU: the first field of its `schedstat`.
fn on_cpu(task: &Path) -> Duration {
    std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_threads_work_is_counted_where_it_belongs() {
        // Spins until this thread has had `d` on a CPU by the kernel's own count: on a busy
        // machine, `d` of wall time can hold much less CPU time than that.
        fn spin(d: Duration) {
            let me = Path::new("/proc/thread-self");
            let start = on_cpu(me);
            let give_up = std::time::Instant::now() + Duration::from_secs(30);
            let mut x = 0u64;
            while on_cpu(me).saturating_sub(start) < d && std::time::Instant::now() < give_up {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
        }
        // This process stands in for Redis too, so its whole time shows there as well.
        let meter = CpuMeter::new(vec![std::process::id()]);
        let before = meter.read();
        let process_before = process_time(std::process::id());
        let (spun, has_spun) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let server = std::thread::Builder::new()
            .name(format!("{SERVER_THREADS}-test"))
            .spawn(move || {
                spin(Duration::from_millis(60));
                spun.send(()).unwrap();
                let _ = released.recv();
            })
            .unwrap();
        spin(Duration::from_millis(60));
        has_spun.recv().unwrap();
        let spent = meter.read().since(&before);
        release.send(()).unwrap();
        server.join().unwrap();
        assert!(spent.server >= Duration::from_millis(50), "{spent:?}");
        assert!(spent.load >= Duration::from_millis(50), "{spent:?}");
        assert!(
            spent.redis >= spent.server + Duration::from_millis(50),
            "{spent:?}"
        );
        // Both threads' time, in the process's own ticks of 10 ms.
        let process_spent = process_time(std::process::id()) - process_before;
        assert!(
            process_spent >= Duration::from_millis(100),
            "{process_spent:?}"
        );
        assert_eq!(process_time(u32::MAX), Duration::ZERO, "no such process");
        let per = spent.per(10);
        assert!((per.total - per.server - per.redis - per.load).abs() < 1e-6);
        assert!(per.server >= 5_000.0, "{per:?}");
    }
}
