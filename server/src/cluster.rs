//! `swblock cluster up|down`: a development master and N volume servers as separate processes
//! on loopback, described by `DIR/cluster.json`:
//!
//! ```json
//! {"master": "127.0.0.1:PORT", "master_http": "...", "master_pid": 123,
//!  "servers": [{"id": "vs1", "pid": 124, "grpc": "...", "repl": "...", "nbd": "...", "http": "..."}]}
//! ```
//!
//! Each process logs to `DIR/<name>.log`; data lives in `DIR/<name>/`. `up` returns once the
//! master has heard from every server; `down` stops them (SIGTERM, then SIGKILL after 5 s).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One volume server of a local cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Server ID.
    pub id: String,
    /// Process ID.
    pub pid: u32,
    /// gRPC address.
    pub grpc: String,
    /// Replication address.
    pub repl: String,
    /// NBD address.
    pub nbd: String,
    /// HTTP status address.
    pub http: String,
    /// Data directory.
    pub data: PathBuf,
}

/// What `cluster.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The master's gRPC address.
    pub master: String,
    /// The master's HTTP status address.
    pub master_http: String,
    /// The master's process ID.
    pub master_pid: u32,
    /// The volume servers.
    pub servers: Vec<ServerEntry>,
    /// The network namespaces the processes run in (`up --netns`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<crate::netns::Netns>,
    /// The cluster secret's file (with namespaces: replication leaves loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Seconds between scrub passes of the volume servers (`up --scrub-interval-s`; none:
    /// the servers' default), kept so a restarted server scrubs as the others do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub_interval_s: Option<u64>,
}

impl ClusterInfo {
    /// Pretty JSON.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads `dir/cluster.json`.
    pub fn load(dir: &Path) -> Result<ClusterInfo, Error> {
        let p = dir.join("cluster.json");
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))?)
    }
}

/// The `key=value` fields of a process's `ready ...` line.
fn ready_fields(line: &str) -> Option<Vec<(String, String)>> {
    let rest = line.trim().strip_prefix("ready ")?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

pub(crate) fn field(fields: &[(String, String)], key: &str) -> Result<String, Error> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| format!("ready line without {key}").into())
}

/// Starts `exe args` with stderr to `log`, and waits (at most 30 s) for its `ready` line.
pub(crate) fn spawn_ready(
    exe: &Path,
    args: &[String],
    log: &Path,
) -> Result<(Child, Vec<(String, String)>), Error> {
    let log_file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .map_err(|e| format!("start {}: {e}", exe.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(l)) => l,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{} {args:?} did not start ({other:?}); see {}",
                exe.display(),
                log.display()
            )
            .into());
        }
    };
    match ready_fields(&line) {
        Some(f) => Ok((child, f)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("unexpected first line {line:?}; see {}", log.display()).into())
        }
    }
}

/// Fetches `http://addr/path` (GET, HTTP/1.1) with a plain socket; the body.
pub fn http_get(addr: &str, path: &str) -> Result<String, Error> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.take(16 << 20).read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("malformed HTTP reply")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")).into());
    }
    Ok(body.to_owned())
}

/// Starts `args` of the `swblock` executable `exe`, in `host`'s namespace when there are
/// namespaces, and waits for its ready line.
fn launch(
    exe: &Path,
    netns: Option<&crate::netns::Netns>,
    host: &str,
    args: Vec<String>,
    log: &Path,
) -> Result<(Child, Vec<(String, String)>), Error> {
    match netns {
        None => spawn_ready(exe, &args, log),
        Some(n) => {
            let mut full = n.exec_prefix(host);
            full.push(exe.display().to_string());
            full.extend(args);
            spawn_ready(Path::new("ip"), &full, log)
        }
    }
}

/// The arguments of the cluster's master in `dir`, listening at `listen` and `http`.
fn master_args(dir: &Path, listen: &str, http: &str) -> Vec<String> {
    vec![
        "master".into(),
        "--data".into(),
        dir.join("master").display().to_string(),
        "--listen".into(),
        listen.into(),
        "--http".into(),
        http.into(),
    ]
}

/// The arguments of volume server `id` (`addrs`: gRPC, replication, NBD, HTTP).
fn volume_args(
    id: &str,
    data: &Path,
    master: &str,
    addrs: [&str; 4],
    secret: Option<&Path>,
    scrub_interval_s: Option<u64>,
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "volume".into(),
        "--id".into(),
        id.into(),
        "--data".into(),
        data.display().to_string(),
        "--master".into(),
        master.into(),
    ];
    for (flag, a) in ["--grpc", "--repl", "--nbd", "--http"]
        .into_iter()
        .zip(addrs)
    {
        v.push(flag.into());
        v.push(a.into());
    }
    if let Some(s) = secret {
        // Off loopback: replication proves the secret, NBD is served to the test's network.
        v.push("--secret-file".into());
        v.push(s.display().to_string());
        v.push("--nbd-allow-remote".into());
    }
    if let Some(s) = scrub_interval_s {
        v.push("--scrub-interval-s".into());
        v.push(s.to_string());
    }
    v
}

/// Starts a master and `n` volume servers under `dir` and writes `dir/cluster.json`; with
/// `netns` (a name prefix; root only), each in its own network namespace (see
/// [`crate::netns`]), with a cluster secret; with `scrub_interval_s`, the servers scrub their
/// volumes that often (`swblock volume --scrub-interval-s`).
pub fn up(
    dir: &Path,
    n: usize,
    netns: Option<&str>,
    scrub_interval_s: Option<u64>,
) -> Result<ClusterInfo, Error> {
    if n == 0 {
        return Err("a cluster needs at least one server".into());
    }
    std::fs::create_dir_all(dir)?;
    if let Ok(c) = ClusterInfo::load(dir)
        && alive(c.master_pid)
    {
        return Err(format!(
            "a cluster is already up in {} (master pid {})",
            dir.display(),
            c.master_pid
        )
        .into());
    }
    let exe = std::env::current_exe()?;
    let ns = match netns {
        Some(prefix) => {
            let hosts: Vec<String> = std::iter::once("m".to_owned())
                .chain((1..=n).map(|i| i.to_string()))
                .collect();
            Some(crate::netns::Netns::create(prefix, &hosts)?)
        }
        None => None,
    };
    let mut children = Vec::new();
    let result = (|| -> Result<ClusterInfo, Error> {
        let secret_file = match &ns {
            Some(_) => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| format!("random secret: {e}"))?;
                let p = dir.join("secret");
                std::fs::write(
                    &p,
                    key.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                )?;
                Some(p)
            }
            None => None,
        };
        let any = |host: &str| {
            ns.as_ref()
                .map_or("127.0.0.1:0".to_owned(), |n| format!("{}:0", n.addr(host)))
        };
        let (master, f) = launch(
            &exe,
            ns.as_ref(),
            "m",
            master_args(dir, &any("m"), &any("m")),
            &dir.join("master.log"),
        )?;
        let master_pid = master.id();
        children.push(master);
        let master_addr = field(&f, "grpc")?;
        let master_http = field(&f, "http")?;
        let mut servers = Vec::new();
        for i in 1..=n {
            let id = format!("vs{i}");
            let data = dir.join(&id);
            let host = i.to_string();
            let a = any(&host);
            let (child, f) = launch(
                &exe,
                ns.as_ref(),
                &host,
                volume_args(
                    &id,
                    &data,
                    &master_addr,
                    [&a, &a, &a, &a],
                    secret_file.as_deref(),
                    scrub_interval_s,
                ),
                &dir.join(format!("{id}.log")),
            )?;
            servers.push(ServerEntry {
                id,
                pid: child.id(),
                grpc: field(&f, "grpc")?,
                repl: field(&f, "repl")?,
                nbd: field(&f, "nbd")?,
                http: field(&f, "http")?,
                data,
            });
            children.push(child);
        }
        let info = ClusterInfo {
            master: master_addr,
            master_http,
            master_pid,
            servers,
            netns: ns.clone(),
            secret_file,
            scrub_interval_s,
        };
        std::fs::write(dir.join("cluster.json"), info.to_json_pretty())?;
        // Ready when the master has heard from every server.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let heard = http_get(&info.master_http, "/status")
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["alive"].as_array().map(Vec::len))
                .unwrap_or(0);
            if heard >= n {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the master heard from {heard} of {n} servers in 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(info)
    })();
    match result {
        Ok(info) => {
            // The processes outlive this command; their exit is `down`'s business.
            for c in children {
                std::mem::forget(c);
            }
            Ok(info)
        }
        Err(e) => {
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Some(n) = &ns {
                n.destroy();
            }
            Err(e)
        }
    }
}

/// Starts volume server `id` of the cluster in `dir` again (after it stopped or was killed),
/// at the same data directory, master and addresses, with stderr to `dir/<id>.restarted.log`;
/// records its new pid in `cluster.json` (so `down` stops it) and returns its entry.
pub fn restart_server(dir: &Path, id: &str) -> Result<ServerEntry, Error> {
    let mut info = ClusterInfo::load(dir)?;
    let i = info
        .servers
        .iter()
        .position(|s| s.id == id)
        .ok_or_else(|| format!("no server {id} in {}", dir.display()))?;
    if alive(info.servers[i].pid) {
        return Err(format!("server {id} is still running (pid {})", info.servers[i].pid).into());
    }
    let exe = std::env::current_exe()?;
    let old = info.servers[i].clone();
    // The same addresses: the master learns a server's NBD address only from its answer to
    // AllocateBlockVolume (the protocol's heartbeat does not carry it), so a server that came
    // back elsewhere would be looked up at its old export.
    let (child, f) = launch(
        &exe,
        info.netns.as_ref(),
        &crate::netns::Netns::host_of(id),
        volume_args(
            id,
            &old.data,
            &info.master,
            [&old.grpc, &old.repl, &old.nbd, &old.http],
            info.secret_file.as_deref(),
            info.scrub_interval_s,
        ),
        &dir.join(format!("{id}.restarted.log")),
    )?;
    let entry = ServerEntry {
        id: id.to_owned(),
        pid: child.id(),
        grpc: field(&f, "grpc")?,
        repl: field(&f, "repl")?,
        nbd: field(&f, "nbd")?,
        http: field(&f, "http")?,
        data: info.servers[i].data.clone(),
    };
    std::mem::forget(child);
    info.servers[i] = entry.clone();
    std::fs::write(dir.join("cluster.json"), info.to_json_pretty())?;
    Ok(entry)
}

/// Starts the master of the cluster in `dir` again, at its old addresses and data directory
/// (its persisted state), and records its pid in `cluster.json`.
pub fn restart_master(dir: &Path) -> Result<ClusterInfo, Error> {
    let mut info = ClusterInfo::load(dir)?;
    if alive(info.master_pid) {
        return Err(format!("the master is still running (pid {})", info.master_pid).into());
    }
    let exe = std::env::current_exe()?;
    let (child, _) = launch(
        &exe,
        info.netns.as_ref(),
        "m",
        master_args(dir, &info.master, &info.master_http),
        &dir.join("master.restarted.log"),
    )?;
    info.master_pid = child.id();
    std::mem::forget(child);
    std::fs::write(dir.join("cluster.json"), info.to_json_pretty())?;
    Ok(info)
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Stops every process `dir/cluster.json` names (SIGCONT first, so a paused one can act on
/// the rest: SIGTERM, then SIGKILL after 5 s), then removes its network namespaces.
pub fn down(dir: &Path) -> Result<(), Error> {
    let info = ClusterInfo::load(dir)?;
    let pids: Vec<u32> = info
        .servers
        .iter()
        .map(|s| s.pid)
        .chain(std::iter::once(info.master_pid))
        .collect();
    for &p in &pids {
        if alive(p) {
            signal(p, "-CONT");
            signal(p, "-TERM");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in &pids {
        if alive(p) {
            signal(p, "-KILL");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    if !left.is_empty() {
        return Err(format!("processes {left:?} did not stop").into());
    }
    if let Some(n) = &info.netns {
        n.destroy();
    }
    println!("cluster in {} is down", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse() {
        let f = ready_fields("ready id=vs1 grpc=127.0.0.1:5 repl=127.0.0.1:6\n").unwrap();
        assert_eq!(field(&f, "grpc").unwrap(), "127.0.0.1:5");
        assert!(field(&f, "nbd").is_err());
        assert!(ready_fields("listening").is_none());
    }
}
