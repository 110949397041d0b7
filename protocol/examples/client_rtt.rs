//! Measures the protocol's own cost: Health round trips through `AgentClient` to a minimal
//! in-process agent over a unix socket pair (no VM, no vsock), one caller and 8 concurrent ones.
//! The floor under the health round trip measured through a real VM.
//!
//! `cargo run --release -p kiln-protocol --example client_rtt [calls]`

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_protocol::codec::read_frame_body;
use kiln_protocol::handshake::{hello_ok, open_connection};
use kiln_protocol::{read_frame, write_frame, AgentClient, AgentMessage, HostMessage, Response};

/// Answers every request with `Ok`, in order, on the calling thread.
fn agent(mut stream: UnixStream) {
    let Ok(body) = read_frame_body(&mut stream) else {
        return;
    };
    if open_connection(&body).is_err() || write_frame(&mut stream, &hello_ok("rtt")).is_err() {
        return;
    }
    while let Ok(HostMessage::Request { id, .. }) = read_frame::<_, HostMessage>(&mut stream) {
        let reply = AgentMessage::Response {
            id,
            response: Response::Ok,
        };
        if write_frame(&mut stream, &reply).is_err() {
            return;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls: usize = std::env::args().nth(1).map_or(Ok(20_000), |a| a.parse())?;
    let (host, guest) = UnixStream::pair()?;
    std::thread::spawn(move || agent(guest));
    let client = Arc::new(AgentClient::connect(host, "client_rtt")?);

    let mut rtts = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        client.health()?;
        rtts.push(t.elapsed());
    }
    rtts.sort_unstable();
    println!(
        "health round trip, 1 caller, {calls} calls: median {:?}, p99 {:?}",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    );

    let threads = 8;
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let client = Arc::clone(&client);
            std::thread::spawn(move || (0..calls / threads).try_for_each(|_| client.health()))
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked")??;
    }
    let elapsed = started.elapsed();
    println!(
        "health calls, {threads} concurrent callers: {:.0} calls/s",
        (calls / threads * threads) as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
