//! `redis-server` processes for the Redis tests: the `REDIS_URL` switch, free loopback ports,
//! a temporary directory, a guard that kills its servers by pid (and reaps them) when dropped,
//! `redis-cli`, and a Redis Cluster started from them. Included by `conformance_redis.rs` and
//! `redis_failover.rs` with `#[path]`; each uses some of it.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The Redis URL from `REDIS_URL`, read at run time. Unset (or empty): the caller skips, and
/// this prints a line saying so, unless `CI=true`, where a missing service is a failure.
pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("REDIS_URL is not set, and CI=true: the Redis tests must run in CI")
        }
        _ => {
            eprintln!("SKIPPED: REDIS_URL is not set, so this Redis test did not run");
            None
        }
    }
}

/// A prefix no other test (in this process or another) uses.
pub(crate) fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "ti-test:{}:{}:{nanos}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A free loopback port whose Cluster bus port (+10000) is free too.
pub(crate) fn free_port() -> u16 {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("addr").port();
        if port < 50_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("redis")
        .join(format!("{name}-{}", unique_prefix().replace(':', "-")));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// `redis-server` processes, killed by pid (and reaped) when dropped.
pub(crate) struct Servers {
    children: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl Servers {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            children: Vec::new(),
            dir,
        }
    }

    pub(crate) fn start(&mut self, port: u16, extra: &[&str]) {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.children.push((port, child));
        wait_until(
            Duration::from_secs(10),
            &format!("redis-server on {port} answers"),
            || cli(port, &["ping"]).is_some_and(|out| out.trim() == "PONG"),
        );
    }

    /// The pid of the server on `port`, if this guard started it and it is not killed.
    pub(crate) fn pid(&self, port: u16) -> Option<u32> {
        self.children
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, child)| child.id())
    }

    /// Kills the server on `port` by pid (`SIGKILL`, no shutdown) and reaps it.
    pub(crate) fn kill(&mut self, port: u16) {
        if let Some(i) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster of `masters` masters with `replicas` replicas each, every slot assigned,
/// `cluster_state:ok` on every node, every node known to every other and every replica in sync
/// with its master (bounded). `extra` goes to every `redis-server`. Returns the guard and the
/// ports (masters and replicas, in no promised order: see [`cluster_nodes`]).
pub(crate) fn start_cluster(
    masters: usize,
    replicas: usize,
    extra: &[&str],
) -> (Servers, Vec<u16>) {
    let mut servers = Servers::new(temp_dir("cluster"));
    let count = masters * (1 + replicas);
    let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
    for &port in &ports {
        let conf = format!("nodes-{port}.conf");
        let mut args = vec!["--cluster-enabled", "yes", "--cluster-config-file", &conf];
        args.extend_from_slice(extra);
        servers.start(port, &args);
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let replicas_arg = replicas.to_string();
    let mut create = vec!["--cluster", "create"];
    create.extend(nodes.iter().map(String::as_str));
    create.extend(["--cluster-replicas", &replicas_arg, "--cluster-yes"]);
    let created = Command::new("redis-cli")
        .args(&create)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run redis-cli --cluster create");
    assert!(created.success(), "redis-cli --cluster create failed");
    let known = format!("cluster_known_nodes:{count}");
    wait_until(
        Duration::from_secs(30),
        "cluster_state:ok on every node, every node known to all",
        || {
            ports.iter().all(|&p| {
                cli(p, &["cluster", "info"])
                    .is_some_and(|info| info.contains("cluster_state:ok") && info.contains(&known))
            })
        },
    );
    if replicas > 0 {
        wait_until(
            Duration::from_secs(30),
            "every replica in sync with its master",
            || {
                let nodes = cluster_nodes(ports[0]);
                nodes.iter().filter(|n| !n.master).count() == masters * replicas
                    && nodes.iter().filter(|n| !n.master).all(|n| {
                        cli(n.port, &["info", "replication"]).is_some_and(|info| {
                            info.contains("master_link_status:up")
                                && info.contains("master_sync_in_progress:0")
                        })
                    })
            },
        );
    }
    (servers, ports)
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub(crate) struct ClusterNode {
    pub(crate) port: u16,
    pub(crate) master: bool,
    pub(crate) failed: bool,
    /// The slot ranges it serves, inclusive (masters only).
    pub(crate) slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub(crate) fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// The Cluster's nodes as the node on `port` sees them (empty if it does not answer).
pub(crate) fn cluster_nodes(port: u16) -> Vec<ClusterNode> {
    let Some(out) = cli(port, &["cluster", "nodes"]) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(ClusterNode {
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?"),
                slots,
            })
        })
        .collect()
}

/// The Cluster slot of a key: CRC16 (XMODEM) of its hash tag (the first non-empty `{…}`) or of
/// the whole key, modulo 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}
