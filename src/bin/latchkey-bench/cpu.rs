//! CPU time and context switches per operation of the three processes a scenario loads:
//! latchkey, redis-server and the benchmark's own clients. On a shared or noisy machine
//! throughput swings from run to run and CPU time with it (a slow spell makes every process
//! slower); context switches per operation count how often a process went to sleep and had to
//! be woken, which depends on the code, not on the machine's speed, and on a VM each one is
//! expensive.

use std::{collections::BTreeMap, time::Duration};

use crate::report::Row;

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ: 100 on every Linux architecture
/// latchkey builds for).
const USER_HZ: f64 = 100.0;

/// User + system CPU time of process `pid` so far, all its threads (dead ones included).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let (_, rest) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    Ok(Duration::from_secs_f64((ticks(11)? + ticks(12)?) / USER_HZ))
}

/// Context switches of process `pid` so far, per live thread (voluntary and involuntary).
fn context_switches(pid: u32) -> anyhow::Result<BTreeMap<u32, u64>> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may exit between listing and reading.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let mut total = 0;
        for line in status.lines() {
            if let Some((key, value)) = line.split_once(':')
                && key.ends_with("ctxt_switches")
            {
                total += value.trim().parse::<u64>()?;
            }
        }
        threads.insert(tid, total);
    }
    Ok(threads)
}

/// Context switches between two readings of [`context_switches`]: each thread alive at the end
/// counts what it did since the start (all of it if it started later). A thread that exited in
/// between takes its count with it (Linux keeps no per-process total for another process);
/// latchkey's and Redis's threads live as long as the process, and the bench's short-lived
/// ones (a progress bar's ticker) sleep most of the time.
fn switches_since(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, &now)| now.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// CPU times and context switches at the start of a scenario.
pub struct CpuMeter {
    processes: Vec<(&'static str, u32, Duration, BTreeMap<u32, u64>)>,
}

impl CpuMeter {
    /// Starts measuring `processes` (label, pid).
    pub fn start(processes: &[(&'static str, u32)]) -> anyhow::Result<Self> {
        let processes = processes
            .iter()
            .map(|&(label, pid)| Ok((label, pid, cpu_time(pid)?, context_switches(pid)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { processes })
    }

    /// Adds "CPU us/op" and "switches/op" to `row`: each process's CPU time (10 ms
    /// resolution, so runs of a few seconds are needed) and context switches since `start`,
    /// divided by the row's operations.
    pub fn finish(self, row: Row) -> anyhow::Result<Row> {
        if row.ops == 0 {
            return Ok(row);
        }
        let ops = row.ops as f64;
        let (mut cpu, mut switches) = (Vec::new(), Vec::new());
        for (label, pid, cpu_before, switches_before) in self.processes {
            let used = cpu_time(pid)?.saturating_sub(cpu_before);
            cpu.push(format!("{label} {:.0}", used.as_secs_f64() * 1e6 / ops));
            let switched = switches_since(&switches_before, &context_switches(pid)?);
            switches.push(format!("{label} {:.1}", switched as f64 / ops));
        }
        Ok(row
            .detail("CPU us/op", cpu.join(", "))
            .detail("switches/op", switches.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's time on a CPU so far, from the scheduler's own nanosecond count
    /// (`/proc/thread-self/schedstat`): a second witness, independent of the tick-based
    /// `/proc/<pid>/stat` that `cpu_time` reads.
    fn thread_on_cpu() -> Duration {
        let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        let ns = schedstat
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Duration::from_nanos(ns)
    }

    #[test]
    fn own_cpu_time_is_read_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let (started, on_cpu) = (std::time::Instant::now(), thread_on_cpu());
        // Spin for 300 ms of CPU, not of wall time: on a loaded machine this thread may get a
        // small share of a core, and the test must not depend on how small.
        let mut x = 0u64;
        while thread_on_cpu() < on_cpu + Duration::from_millis(300) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "never got 300 ms of CPU"
            );
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
        let after = cpu_time(pid).unwrap();
        let wall = started.elapsed();
        // Ticks are 10 ms and sampled, hence the 50 ms of slack; no process gets more CPU
        // than its wall time on every core.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert!(
            after >= before + Duration::from_millis(250)
                && after <= before + wall * cores + Duration::from_millis(50),
            "{before:?} -> {after:?} in {wall:?} on {cores} cores"
        );
    }

    /// A thread that has slept `sleeps` times for 1 ms (so switched at least that often)
    /// and stays alive, its count with it, until `exit`.
    struct Sleeper {
        exit: std::sync::mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Sleeper {
        fn spawn(sleeps: u32) -> Self {
            let (slept_tx, slept_rx) = std::sync::mpsc::channel();
            let (exit, exit_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                for _ in 0..sleeps {
                    std::thread::sleep(Duration::from_millis(1));
                }
                slept_tx.send(()).unwrap();
                let _ = exit_rx.recv();
            });
            slept_rx.recv().unwrap();
            Self { exit, thread }
        }

        fn exit(self) {
            drop(self.exit);
            self.thread.join().unwrap();
        }
    }

    #[test]
    fn a_thread_that_sleeps_and_wakes_counts_context_switches() {
        let pid = std::process::id();
        let before = context_switches(pid).unwrap();
        let sleeper = Sleeper::spawn(20);
        let during = context_switches(pid).unwrap();
        sleeper.exit();
        let switched = switches_since(&before, &during);
        assert!(switched >= 20, "{switched} switches");
    }

    #[test]
    fn a_busy_thread_exiting_does_not_hide_the_switches_of_the_others() {
        let pid = std::process::id();
        // A thread that has switched a lot is alive at the first reading and gone at the
        // second (a progress bar's ticker, in the bench): summing over live threads used to
        // come out below the first reading, and the whole row showed 0.
        let busy = Sleeper::spawn(100);
        let before = context_switches(pid).unwrap();
        busy.exit();
        let sleeper = Sleeper::spawn(20);
        let after = context_switches(pid).unwrap();
        sleeper.exit();
        let switched = switches_since(&before, &after);
        assert!(switched >= 20, "{switched} switches");
    }
}
