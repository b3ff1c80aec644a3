//! What the machine itself allows: the cost of one round trip over loopback TCP between two
//! threads that sleep while they wait, as every hop between the bench's clients, latchkey and
//! Redis does. Measured before and after the scenarios, it shows how fast the machine was
//! during the run (a shared VM can change by half from one hour to the next), and it bounds the
//! hot-lock chain: a hand-off is at least two such round trips in a row (the grant's reply and
//! the holder's Release; the release script to Redis and back), whatever latchkey does.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::report::{Row, histogram, record};

/// How long the probe around each load row runs.
const PROBE: Duration = Duration::from_millis(200);

/// Ping-pongs one byte between two threads over loopback TCP for `duration`.
pub async fn loopback_round_trip(when: &str, duration: Duration) -> anyhow::Result<Row> {
    let when = when.to_owned();
    tokio::task::spawn_blocking(move || {
        let bounced = ping_pong(duration)?;
        let mean_us = bounced.mean_us();
        Ok(Row::new(
            "machine",
            &format!("loopback TCP round trip, 2 threads ({when})"),
        )
        .throughput(bounced.ops, bounced.elapsed, "round trips/s")
        .latency(&bounced.hist)
        .detail("mean us", format!("{mean_us:.0}"))
        .detail(
            "hot-lock ceiling (2 round trips per hand-off, no work)",
            format!("{:.0} hand-offs/s", 1e6 / (2.0 * mean_us)),
        )
        .check(
            bounced.wrong == 0,
            format!("every byte came back ({} wrong)", bounced.wrong),
        ))
    })
    .await?
}

/// The mean loopback round trip over a short probe, in microseconds: what a load row's
/// details give for right before and right after it. A byte that came back wrong fails it.
pub async fn round_trip_us() -> anyhow::Result<f64> {
    let bounced = tokio::task::spawn_blocking(|| ping_pong(PROBE)).await??;
    anyhow::ensure!(
        bounced.wrong == 0,
        "the round-trip probe got {} wrong bytes back",
        bounced.wrong
    );
    Ok(bounced.mean_us())
}

/// What one ping-pong measured.
struct Bounced {
    ops: u64,
    wrong: u64,
    elapsed: Duration,
    hist: hdrhistogram::Histogram<u64>,
}

impl Bounced {
    fn mean_us(&self) -> f64 {
        self.hist.mean().max(1.0)
    }
}

fn ping_pong(duration: Duration) -> anyhow::Result<Bounced> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut ping = TcpStream::connect(listener.local_addr()?)?;
    let (mut pong, _) = listener.accept()?;
    ping.set_nodelay(true)?;
    pong.set_nodelay(true)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut byte = [0u8];
        // Ends when the ping side closes (read returns 0).
        while pong.read(&mut byte)? == 1 {
            pong.write_all(&byte)?;
        }
        Ok(())
    });

    let mut hist = histogram();
    let mut wrong = 0u64;
    let mut ops = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = [(ops % 251) as u8];
        let t = Instant::now();
        ping.write_all(&sent)?;
        let mut back = [0u8];
        ping.read_exact(&mut back)?;
        record(&mut hist, t.elapsed());
        wrong += u64::from(back != sent);
        ops += 1;
    }
    let elapsed = started.elapsed();
    drop(ping);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(Bounced {
        ops,
        wrong,
        elapsed,
        hist,
    })
}
