//! A TCP proxy that adds a fixed one-way latency in each direction, for running the bench as if
//! the database were across a network (`BENCH_DB_DELAY_US`): the kernel here has no `tc netem`.
//!
//! It behaves like a link with latency, not a bottleneck: every chunk read at `t` is written at
//! `t + d`, whatever else is in flight (chunks are pipelined), in order per direction. Each
//! direction of each connection has two plain threads (tokio's timer has 1 ms granularity, too
//! coarse for d = 0.5 ms): one reads the source socket and queues `(due, bytes)`, the other waits
//! until `due` (`thread::sleep`, see [`SLACK`]) and writes. The threads block in `read`, `recv`
//! or `sleep`: nothing spins.
//!
//! The proxy connects only to the one upstream it is given and lives as long as the process.
//! Connecting through it costs no added delay (the TCP handshake is not delayed), only the bytes.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// How much earlier than its due instant the writer asks to wake: `thread::sleep` on Linux
/// overshoots by the timer slack (50 µs by default), so asking for [`SLACK`] less wakes about on
/// time. No spinning: on a 2-core machine shared with the server under test and the database,
/// a spin per chunk would take CPU from both (the round trip actually added is measured and
/// printed at start instead).
const SLACK: Duration = Duration::from_micros(50);

/// The largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// Chunks in flight per direction before the reader waits for the writer (at most
/// `IN_FLIGHT * CHUNK` bytes queued): far more than the bench's traffic ever queues, so it never
/// throttles, but memory stays bounded if a receiver stops reading.
const IN_FLIGHT: usize = 1024;

/// Starts a proxy listening on 127.0.0.1 (an ephemeral port) that forwards every accepted
/// connection to `upstream`, each chunk of bytes delayed by `one_way` in each direction (a round
/// trip through it costs about `2 * one_way` more). Returns the address to connect to; the
/// accept loop runs on a thread of its own for the rest of the process.
pub fn start(upstream: SocketAddr, one_way: Duration) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::Builder::new()
        .name("delay-accept".into())
        .spawn(move || accept_loop(listener, upstream, one_way))?;
    Ok(addr)
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, one_way: Duration) {
    loop {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = forward(client, upstream, one_way) {
                    eprintln!("delay proxy: connection to {upstream} failed: {e}");
                }
            }
            // Out of descriptors or the like: wait rather than spin on the error.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Connects to `upstream` and starts both directions between it and `client`.
fn forward(client: TcpStream, upstream: SocketAddr, one_way: Duration) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    pipe(client.try_clone()?, server.try_clone()?, one_way)?;
    pipe(server, client, one_way)
}

/// One direction, `from` to `to`: a reader thread and a writer thread joined by a channel.
fn pipe(from: TcpStream, to: TcpStream, one_way: Duration) -> io::Result<()> {
    // `None` is the end of the stream (EOF or a read error).
    let (tx, rx) = mpsc::sync_channel::<(Instant, Option<Vec<u8>>)>(IN_FLIGHT);
    let source = from.try_clone()?;
    thread::Builder::new()
        .name("delay-read".into())
        .spawn(move || read_side(from, tx, one_way))?;
    thread::Builder::new()
        .name("delay-write".into())
        .spawn(move || write_side(to, source, rx))?;
    Ok(())
}

fn read_side(
    mut from: TcpStream,
    tx: mpsc::SyncSender<(Instant, Option<Vec<u8>>)>,
    one_way: Duration,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let chunk = match from.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => None,
        };
        let end = chunk.is_none();
        // The writer is gone (its socket failed): stop reading.
        if tx.send((Instant::now() + one_way, chunk)).is_err() || end {
            return;
        }
    }
}

/// Writes each chunk at its due instant; at the end of the stream, shuts down the write half of
/// `to` (the peer sees EOF, as it would without the proxy). If `to` fails, shuts down `source`
/// too so that its reader, and the peer behind it, see the connection end.
fn write_side(
    mut to: TcpStream,
    source: TcpStream,
    rx: mpsc::Receiver<(Instant, Option<Vec<u8>>)>,
) {
    while let Ok((due, chunk)) = rx.recv() {
        wait_until(due);
        match chunk {
            Some(bytes) => {
                if to.write_all(&bytes).is_err() {
                    let _ = source.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Sleeps until about `due` (see [`SLACK`]).
fn wait_until(due: Instant) {
    let wake = due.checked_sub(SLACK).unwrap_or(due);
    let now = Instant::now();
    if wake > now {
        thread::sleep(wake - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1:0, one thread per connection.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn delays_each_way_and_keeps_bytes_in_order() {
        let one_way = Duration::from_millis(2);
        let proxy = start(echo_server(), one_way).unwrap();
        let mut stream = TcpStream::connect(proxy).unwrap();
        stream.set_nodelay(true).unwrap();

        // A round trip: one byte there and back, delayed both ways: at least 2 * one_way, less
        // the early wake-up each direction allows for (SLACK). A lower bound only: sleeping
        // never ends early, and nothing here asserts how much longer it takes.
        for _ in 0..3 {
            let t = Instant::now();
            stream.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            stream.read_exact(&mut one).unwrap();
            let rtt = t.elapsed();
            assert_eq!(&one, b"x");
            let least = 2 * (one_way - SLACK);
            assert!(
                rtt >= least,
                "round trip {rtt:?} < {least:?}: the bytes were not delayed"
            );
        }

        // 100 KB in pieces of varied sizes, read back concurrently: byte-identical, in order.
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
            .collect();
        let mut reader = stream.try_clone().unwrap();
        let len = data.len();
        let back = thread::spawn(move || {
            let mut back = vec![0u8; len];
            reader.read_exact(&mut back).unwrap();
            back
        });
        let mut sent = 0;
        let mut piece = 1;
        while sent < data.len() {
            let end = (sent + piece).min(data.len());
            stream.write_all(&data[sent..end]).unwrap();
            sent = end;
            piece = piece * 7 % 5003 + 1;
        }
        let back = back.join().unwrap();
        assert!(back == data, "the echoed bytes differ from those sent");

        // EOF goes through: shutting down our write half ends the echo, which closes its side.
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
