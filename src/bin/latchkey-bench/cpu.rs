//! CPU time, context switches and time spent waiting for a core, per operation, of the three
//! processes a scenario loads (latchkey, redis-server and the benchmark's own clients), and how
//! busy the machine's cores were. On a shared or noisy machine throughput swings from run to
//! run and CPU time with it (a slow spell makes every process slower); context switches per
//! operation count how often a process went to sleep and had to be woken, which depends on the
//! code, not on the machine's speed, and on a VM each one is expensive. The wait for a core
//! (the scheduler's run-queue delay) and the cores' busy share tell a row limited by CPU from
//! one limited by waiting on each other: when the three processes want more than the cores
//! have, every request queues for a core several times on its way, and that queueing, not the
//! work, sets the tail latency.

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

/// What the scheduler counted for one thread so far.
#[derive(Debug, Clone, Copy, Default)]
struct ThreadStat {
    /// Context switches, voluntary and involuntary.
    switches: u64,
    /// Time spent runnable but waiting for a core (`schedstat`'s run delay), if the kernel
    /// keeps it.
    waited: Option<Duration>,
}

/// [`ThreadStat`]s of process `pid`'s live threads.
fn threads(pid: u32) -> anyhow::Result<BTreeMap<u32, ThreadStat>> {
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
        let mut switches = 0;
        for line in status.lines() {
            if let Some((key, value)) = line.split_once(':')
                && key.ends_with("ctxt_switches")
            {
                switches += value.trim().parse::<u64>()?;
            }
        }
        // "<ns on a core> <ns waiting for one> <slices>"; absent without CONFIG_SCHED_INFO.
        let waited = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .map(Duration::from_nanos);
        threads.insert(tid, ThreadStat { switches, waited });
    }
    Ok(threads)
}

/// What the threads did between two readings of [`threads`]: each thread alive at the end
/// counts what it did since the start (all of it if it started later). A thread that exited in
/// between takes its counts with it (Linux keeps no per-process total for another process);
/// latchkey's and Redis's threads live as long as the process, and the bench's short-lived
/// ones (a progress bar's ticker) sleep most of the time. `waited` is None if the kernel
/// keeps no run delay.
fn since(
    before: &BTreeMap<u32, ThreadStat>,
    after: &BTreeMap<u32, ThreadStat>,
) -> (u64, Option<Duration>) {
    let mut switches = 0;
    let mut waited = Some(Duration::ZERO);
    for (tid, now) in after {
        let then = before.get(tid).copied().unwrap_or_default();
        switches += now.switches.saturating_sub(then.switches);
        waited = match (waited, now.waited) {
            (Some(sum), Some(now)) => {
                Some(sum + now.saturating_sub(then.waited.unwrap_or_default()))
            }
            _ => None,
        };
    }
    (switches, waited)
}

/// The machine's CPU time so far, all cores, from `/proc/stat`: (busy, steal, total) in
/// ticks. Busy is everything but idle, I/O wait and steal; steal is time the hypervisor gave
/// this VM's cores to someone else.
fn machine_ticks() -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("no cpu line in /proc/stat"))?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(fields.len() == 8, "short cpu line in /proc/stat: {line}");
    let total: u64 = fields.iter().sum();
    let (idle, iowait, steal) = (fields[3], fields[4], fields[7]);
    Ok((total - idle - iowait - steal, steal, total))
}

/// CPU times and per-thread counts at the start of a scenario.
pub struct CpuMeter {
    processes: Vec<(&'static str, u32, Duration, BTreeMap<u32, ThreadStat>)>,
    machine: (u64, u64, u64),
}

impl CpuMeter {
    /// Starts measuring `processes` (label, pid) and the machine's cores.
    pub fn start(processes: &[(&'static str, u32)]) -> anyhow::Result<Self> {
        let processes = processes
            .iter()
            .map(|&(label, pid)| Ok((label, pid, cpu_time(pid)?, threads(pid)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            processes,
            machine: machine_ticks()?,
        })
    }

    /// Adds "CPU us/op", "switches/op" and "waited for a core us/op" to `row`: each
    /// process's CPU time (10 ms resolution, so runs of a few seconds are needed), context
    /// switches and run-queue delay since `start`, divided by the row's operations; and
    /// "cores busy": the share of all cores' time that went to any process (steal: to other
    /// VMs) meanwhile.
    pub fn finish(self, row: Row) -> anyhow::Result<Row> {
        if row.ops == 0 {
            return Ok(row);
        }
        let ops = row.ops as f64;
        let (mut cpu, mut switches, mut waits) = (Vec::new(), Vec::new(), Some(Vec::new()));
        for (label, pid, cpu_before, threads_before) in self.processes {
            let used = cpu_time(pid)?.saturating_sub(cpu_before);
            cpu.push(format!("{label} {:.0}", used.as_secs_f64() * 1e6 / ops));
            let (switched, waited) = since(&threads_before, &threads(pid)?);
            switches.push(format!("{label} {:.1}", switched as f64 / ops));
            waits = waits.zip(waited).map(|(mut waits, waited)| {
                waits.push(format!("{label} {:.0}", waited.as_secs_f64() * 1e6 / ops));
                waits
            });
        }
        let (busy, steal, total) = machine_ticks()?;
        let (busy0, steal0, total0) = self.machine;
        let share = |n: u64| n as f64 * 100.0 / total.saturating_sub(total0).max(1) as f64;
        let row = row
            .detail("CPU us/op", cpu.join(", "))
            .detail("switches/op", switches.join(", "));
        let row = match waits {
            Some(waits) => row.detail("waited for a core us/op", waits.join(", ")),
            None => row,
        };
        Ok(row.detail(
            "cores busy",
            format!(
                "{:.0}% (steal {:.0}%)",
                share(busy.saturating_sub(busy0)),
                share(steal.saturating_sub(steal0))
            ),
        ))
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
        let before = threads(pid).unwrap();
        let sleeper = Sleeper::spawn(20);
        let during = threads(pid).unwrap();
        sleeper.exit();
        let (switched, _) = since(&before, &during);
        assert!(switched >= 20, "{switched} switches");
    }

    #[test]
    fn a_busy_thread_exiting_does_not_hide_the_switches_of_the_others() {
        let pid = std::process::id();
        // A thread that has switched a lot is alive at the first reading and gone at the
        // second (a progress bar's ticker, in the bench): summing over live threads used to
        // come out below the first reading, and the whole row showed 0.
        let busy = Sleeper::spawn(100);
        let before = threads(pid).unwrap();
        busy.exit();
        let sleeper = Sleeper::spawn(20);
        let after = threads(pid).unwrap();
        sleeper.exit();
        let (switched, _) = since(&before, &after);
        assert!(switched >= 20, "{switched} switches");
    }

    /// The CPUs online on this machine: at least as many as this process may use.
    fn online_cpus() -> usize {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        online
            .trim()
            .split(',')
            .map(|range| match range.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum()
    }

    /// This thread's id, as `/proc/<pid>/task/<tid>` names it.
    fn tid() -> u32 {
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        link.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    #[test]
    fn threads_that_want_more_cores_than_there_are_wait_for_one() {
        let pid = std::process::id();
        let before = threads(pid).unwrap();
        // Four spinners per CPU, started together, each until it had 50 ms on a core: while
        // all of them spin, three of every four wait, so they wait about three times as long
        // as they run (more if other processes want the cores too; the last few to finish
        // wait less). Reading the wrong schedstat field (time on a core) would come out at
        // about once as long.
        let spinners = 4 * online_cpus();
        let start = std::sync::Arc::new(std::sync::Barrier::new(spinners));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (exit, exit_rx) = std::sync::mpsc::channel::<()>();
        let exit_rx = std::sync::Arc::new(std::sync::Mutex::new(exit_rx));
        let handles: Vec<_> = (0..spinners)
            .map(|_| {
                let (start, done_tx, exit_rx) = (start.clone(), done_tx.clone(), exit_rx.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let on_cpu = thread_on_cpu();
                    let mut x = 0u64;
                    while thread_on_cpu() < on_cpu + Duration::from_millis(50) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
                        }
                    }
                    done_tx.send((tid(), thread_on_cpu() - on_cpu)).unwrap();
                    // Alive (and asleep) until read, so its counts are still there.
                    let _ = exit_rx.lock().unwrap().recv();
                })
            })
            .collect();
        let (tids, ran): (Vec<u32>, Vec<Duration>) = (0..spinners)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(120)).unwrap())
            .unzip();
        let after = threads(pid).unwrap();
        drop(exit);
        for handle in handles {
            handle.join().unwrap();
        }
        // Only the spinners: other tests run threads in this process at the same time.
        let spinners_only = |all: BTreeMap<u32, ThreadStat>| -> BTreeMap<u32, ThreadStat> {
            all.into_iter().filter(|(t, _)| tids.contains(t)).collect()
        };
        let (_, waited) = since(&spinners_only(before), &spinners_only(after));
        let waited =
            waited.expect("this kernel keeps run delays (/proc/<pid>/task/<tid>/schedstat)");
        let ran: Duration = ran.iter().sum();
        assert!(
            waited >= ran * 3 / 2,
            "{spinners} spinners waited {waited:?} in all and ran {ran:?}"
        );
    }

    #[test]
    fn the_busy_share_of_the_cores_grows_with_work() {
        let (busy0, steal0, total0) = machine_ticks().unwrap();
        let on_cpu = thread_on_cpu();
        let mut x = 0u64;
        while thread_on_cpu() < on_cpu + Duration::from_millis(300) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
        let (busy, steal, total) = machine_ticks().unwrap();
        // 300 ms of this thread alone is 30 ticks; ticks are sampled, hence the slack.
        assert!(busy - busy0 >= 25, "busy {busy0} -> {busy}");
        assert!(
            total - total0 >= (busy - busy0) + (steal - steal0),
            "total {total0} -> {total}, busy {busy0} -> {busy}, steal {steal0} -> {steal}"
        );
    }
}
