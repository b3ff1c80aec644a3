//! CPU time per operation of the three processes a scenario loads: latchkey, redis-server and
//! the benchmark's own clients. On a shared or noisy machine throughput swings from run to
//! run; CPU time per operation barely moves, so it is the figure to compare when profiling.

use std::time::Duration;

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

/// CPU times at the start of a scenario.
pub struct CpuMeter {
    processes: Vec<(&'static str, u32, Duration)>,
}

impl CpuMeter {
    /// Starts measuring `processes` (label, pid).
    pub fn start(processes: &[(&'static str, u32)]) -> anyhow::Result<Self> {
        let processes = processes
            .iter()
            .map(|&(label, pid)| Ok((label, pid, cpu_time(pid)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { processes })
    }

    /// Adds "CPU us/op" to `row`: each process's CPU time since `start` divided by the row's
    /// operations (10 ms resolution, so runs of a few seconds are needed).
    pub fn finish(self, row: Row) -> anyhow::Result<Row> {
        if row.ops == 0 {
            return Ok(row);
        }
        let mut parts = Vec::new();
        for (label, pid, before) in self.processes {
            let used = cpu_time(pid)?.saturating_sub(before);
            let per_op = used.as_secs_f64() * 1e6 / row.ops as f64;
            parts.push(format!("{label} {per_op:.0}"));
        }
        Ok(row.detail("CPU us/op", parts.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_read_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = cpu_time(pid).unwrap();
        assert!(
            after >= before + Duration::from_millis(100),
            "{before:?} -> {after:?}"
        );
    }
}
