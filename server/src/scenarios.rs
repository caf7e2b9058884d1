//! The cluster scenario: a master and three volume servers as processes (`swblock cluster
//! up`), driven by clients we did not write (`qemu-io`, `qemu-img` through `nbd://`), checked
//! against an oracle image kept here. `cargo xtask chain-test` reports each step as a
//! `cluster/<step>` row; `server/tests/cluster.rs` runs it as a test.
//!
//! The steps, in order (each needs the ones before it; after a failed step the rest are
//! reported as not run):
//! 1. `up`: the cluster starts; `v1` (64 MiB, three copies, `sync_all`) and `v2` (16 MiB,
//!    three copies, `sync_quorum`) are created and served by their primaries.
//! 2. `qemu_io_patterns`: `qemu-io` writes patterns (aligned and not) and flushes; a second
//!    `qemu-io` reads every pattern back and the untouched ranges as zeros.
//! 3. `image_roundtrip`: `qemu-img convert` copies a random 64 MiB image into `v1` and back
//!    out, equal to the byte.
//! 4. `sync_all_refuses`: with a replica server killed, a `sync_all` flush on `v1` fails; it is
//!    not acknowledged as durable.
//! 5. `replica_catch_up`: meanwhile `sync_quorum` writes to `v2` are acknowledged; the replica
//!    server restarts and is brought back by a catch-up (not a rebuild), to the primary's
//!    digest.
//! 6. `failover`: kill -9 of `v1`'s primary after flushed writes; the master waits out its
//!    lease, promotes a replica, and every flushed write reads back through NBD from it.
//! 7. `old_primary_returns`: the old primary restarts, is brought back by the new primary, and
//!    holds the new primary's bytes (digests over the replication port, equal to the oracle).
//! 8. `lease_expiry`: the master is killed; once the primary's lease runs out, writes through
//!    NBD fail; the master restarts from its persisted state with the same placement and
//!    epoch, renews the lease, and writes succeed again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::cluster::{ClusterInfo, ServerEntry, alive, http_get};

type Error = String;

/// One step's result.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step (`up`, `qemu_io_patterns`, ...).
    pub name: &'static str,
    /// What happened, for people.
    pub outcome: String,
    /// The recovery path or client path the step exercised.
    pub path: String,
    /// Bytes the clients moved through NBD, or a recovery moved.
    pub bytes: u64,
    /// Whether the step compared bytes (read back through NBD, digests over the replication
    /// port) with the oracle and found them equal; false for steps that check a start or a
    /// refusal.
    pub digest_match: bool,
    /// Whether the step's checks passed.
    pub passed: bool,
    /// The first failed check.
    pub failure: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

/// The steps in order.
pub const STEPS: [&str; 9] = [
    "up",
    "qemu_io_patterns",
    "image_roundtrip",
    "sync_all_refuses",
    "replica_catch_up",
    "failover",
    "old_primary_returns",
    "lease_expiry",
    "scrub_repair",
];

/// What a step found when it passed.
struct Found {
    outcome: String,
    path: String,
    bytes: u64,
    /// Whether the step compared bytes with the oracle (and they matched).
    compared: bool,
}

fn found(outcome: impl Into<String>, path: impl Into<String>, bytes: u64) -> Found {
    Found {
        outcome: outcome.into(),
        path: path.into(),
        bytes,
        compared: true,
    }
}

impl Found {
    /// A step that checks a refusal or a start, not bytes.
    fn uncompared(mut self) -> Self {
        self.compared = false;
        self
    }
}

/// Whether the NBD clients the scenario drives are installed.
pub fn clients_missing() -> Option<String> {
    for tool in ["qemu-io", "qemu-img"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("{tool} is not installed (Debian: qemu-utils)"));
        }
    }
    None
}

/// A running cluster, brought down when dropped (also when a step panics).
struct Run {
    swblock: PathBuf,
    dir: PathBuf,
    info: ClusterInfo,
    master: String,
    /// The oracle of `v1`: every acknowledged write applied to zeros.
    v1: Vec<u8>,
    /// The oracle of `v2`.
    v2: Vec<u8>,
    /// The replica server killed in step 4 and restarted in step 5.
    down_replica: Option<ServerEntry>,
    /// `v1`'s primary killed in step 6.
    victim: Option<ServerEntry>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = Command::new(&self.swblock)
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

const V1_BYTES: usize = 64 << 20;
/// The cluster's servers scrub every volume this often (a pass over v1 takes 2 s at the
/// default 32 MiB/s), so scrubs run during the failovers and restarts of every step.
const SCRUB_INTERVAL_S: u64 = 3;
const V2_BYTES: usize = 16 << 20;

fn output(cmd: &mut Command) -> Result<Output, Error> {
    cmd.output().map_err(|e| format!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> Result<String, Error> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `qemu-io` with `cmds` on `uri`; whether every command succeeded, and its output.
/// (qemu-io reports a failed command on its output and, depending on the version, may still
/// exit 0.)
fn qemu_io(uri: &str, cmds: &[String]) -> Result<(bool, String), Error> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = output(c.arg(uri))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("failed") || text.contains("error") || text.contains("Error");
    Ok((out.status.success() && !failed, text))
}

fn wait_until(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<bool, Error>,
) -> Result<(), Error> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {limit:?} waiting for {what} {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = vec![0u8; n];
    for chunk in data.chunks_mut(8) {
        // xorshift: incompressible, different in every block.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

fn put(oracle: &mut [u8], offset: usize, len: usize, byte: u8) {
    oracle[offset..offset + len].fill(byte);
}

impl Run {
    fn block(&self, args: &[&str]) -> Result<String, Error> {
        ok(Command::new(&self.swblock)
            .arg("block")
            .args(args)
            .args(["--master", &self.master]))
    }

    fn lookup(&self, name: &str) -> Result<serde_json::Value, Error> {
        let out = self.block(&["lookup", name, "--json"])?;
        serde_json::from_str(out.trim()).map_err(|e| format!("lookup {name}: {e}: {out}"))
    }

    /// `swblock block status NAME --json`: the master's record and every copy's status.
    fn status(&self, name: &str) -> Result<serde_json::Value, Error> {
        let out = ok(Command::new(&self.swblock).args([
            "block",
            "status",
            name,
            "--json",
            "--master-http",
            &self.info.master_http,
        ]))?;
        serde_json::from_str(out.trim()).map_err(|e| format!("status {name}: {e}: {out}"))
    }

    /// The epoch the master has for `name`.
    fn epoch(&self, name: &str) -> Result<u64, Error> {
        let out = ok(Command::new(&self.swblock).args([
            "block",
            "list",
            "--json",
            "--master-http",
            &self.info.master_http,
        ]))?;
        let l: serde_json::Value =
            serde_json::from_str(out.trim()).map_err(|e| format!("list: {e}: {out}"))?;
        l["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .and_then(|v| v["epoch"].as_u64())
            .ok_or_else(|| format!("block list has no epoch for {name}: {l}"))
    }

    /// (primary id, NBD URI) of `name` as the master has it.
    fn primary(&self, name: &str) -> Result<(String, String), Error> {
        let l = self.lookup(name)?;
        Ok((
            l["primary"].as_str().unwrap_or_default().to_owned(),
            l["nbd_uri"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    fn server(&self, id: &str) -> Result<ServerEntry, Error> {
        let info = ClusterInfo::load(&self.dir).map_err(|e| e.to_string())?;
        info.servers
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| format!("no server {id}"))
    }

    fn wait_serving(&self, uri: &str) -> Result<(), Error> {
        wait_until(&format!("{uri} to serve"), Duration::from_secs(30), || {
            Ok(qemu_io(uri, &["read 0 4k".into()])?.0)
        })
    }

    fn kill9(&self, s: &ServerEntry) -> Result<(), Error> {
        ok(Command::new("kill").args(["-9", &s.pid.to_string()]))?;
        wait_until("the process to die", Duration::from_secs(5), || {
            Ok(!alive(s.pid))
        })
    }

    fn restart(&self, id: &str) -> Result<ServerEntry, Error> {
        let out = ok(Command::new(&self.swblock)
            .args(["cluster", "restart", "--dir"])
            .arg(&self.dir)
            .args(["--server", id]))?;
        serde_json::from_str(out.trim()).map_err(|e| format!("restart {id}: {e}: {out}"))
    }

    /// The `/status` entry of `volume` on server `s`.
    fn volume_status(&self, s: &ServerEntry, volume: &str) -> Result<serde_json::Value, Error> {
        let body = http_get(&s.http, "/status").map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        v["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == volume)
            .cloned()
            .ok_or_else(|| format!("{} does not report {volume}", s.id))
    }

    /// Waits until `volume`'s primary reports every replica streaming and durable at its
    /// head; returns the primary's status entry.
    fn wait_in_sync(
        &self,
        primary: &ServerEntry,
        volume: &str,
    ) -> Result<serde_json::Value, Error> {
        let mut last = serde_json::Value::Null;
        wait_until(
            &format!("{volume}'s replicas in sync"),
            Duration::from_secs(60),
            || {
                let v = self.volume_status(primary, volume)?;
                let head = v["head"].as_u64().unwrap_or(0);
                let reps = v["replicas"].as_array().cloned().unwrap_or_default();
                let done = reps.len() == 2
                    && reps
                        .iter()
                        .all(|r| r["state"] == "streaming" && r["durable"].as_u64() == Some(head));
                last = v;
                Ok(done)
            },
        )
        .map_err(|e| format!("{e}; last status {last}"))?;
        Ok(last)
    }

    /// The digest of `volume` on `s`, over its replication port.
    fn digest(&self, s: &ServerEntry, volume: &str) -> Result<u128, Error> {
        let addr = s.repl.parse().map_err(|e| format!("{}: {e}", s.repl))?;
        let mut r = transport::net::RemoteReplica::connect(
            addr,
            volume,
            &transport::net::ClientConfig::default(),
        )
        .map_err(|e| format!("connect {}: {e}", s.repl))?;
        r.probe(true)
            .map_err(|e| format!("probe {volume} on {}: {e}", s.id))?
            .digest
            .ok_or_else(|| format!("{} sent no digest", s.id))
    }

    fn read_back(&self, uri: &str, want: &[u8], what: &str) -> Result<(), Error> {
        let back = self.dir.join(format!("{what}.raw"));
        ok(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&back))?;
        let got = std::fs::read(&back).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&back);
        if got.len() != want.len() {
            return Err(format!(
                "{what}: read {} bytes, want {}",
                got.len(),
                want.len()
            ));
        }
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            return Err(format!(
                "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
                got[i], want[i]
            ));
        }
        Ok(())
    }

    fn step(&mut self, name: &str) -> Result<Found, Error> {
        match name {
            "up" => self.up(),
            "qemu_io_patterns" => self.patterns(),
            "image_roundtrip" => self.roundtrip(),
            "sync_all_refuses" => self.sync_all_refuses(),
            "replica_catch_up" => self.replica_catch_up(),
            "failover" => self.failover(),
            "old_primary_returns" => self.old_primary_returns(),
            "lease_expiry" => self.lease_expiry(),
            "scrub_repair" => self.scrub_repair(),
            other => Err(format!("no step {other}")),
        }
    }

    fn up(&mut self) -> Result<Found, Error> {
        for (name, size, mode) in [("v1", "64M", "sync_all"), ("v2", "16M", "sync_quorum")] {
            self.block(&["create", name, "--size", size, "--rf", "3", "--mode", mode])?;
        }
        for name in ["v1", "v2"] {
            let l = self.lookup(name)?;
            let reps = l["replicas"].as_array().map_or(0, Vec::len);
            if reps != 2 {
                return Err(format!("{name}: {reps} replicas placed, want 2: {l}"));
            }
            let (_, uri) = self.primary(name)?;
            if !uri.starts_with("nbd://127.0.0.1:") {
                return Err(format!("{name}: NBD URI {uri:?}"));
            }
            self.wait_serving(&uri)?;
        }
        Ok(found(
            format!(
                "{} servers, v1 sync_all + v2 sync_quorum",
                self.info.servers.len()
            ),
            "cluster up, block create",
            0,
        )
        .uncompared())
    }

    fn patterns(&mut self) -> Result<Found, Error> {
        let (_, uri) = self.primary("v1")?;
        // (offset, length, byte): block-aligned, sub-block and straddling blocks.
        let writes: [(usize, usize, u8); 4] = [
            (0, 64 << 10, 0xa1),
            (1 << 20, 4 << 10, 0xb2),
            ((3 << 20) + 512, 1536, 0xc3),
            ((5 << 20) - 100, 300, 0xd4),
        ];
        let mut cmds: Vec<String> = writes
            .iter()
            .map(|(o, l, b)| format!("write -P {b:#x} {o} {l}"))
            .collect();
        cmds.push("flush".into());
        let (good, text) = qemu_io(&uri, &cmds)?;
        if !good {
            return Err(format!("qemu-io writes: {text}"));
        }
        for (o, l, b) in writes {
            put(&mut self.v1, o, l, b);
        }
        // A second client reads every pattern and the zeros around them.
        let mut reads: Vec<String> = writes
            .iter()
            .map(|(o, l, b)| format!("read -P {b:#x} {o} {l}"))
            .collect();
        reads.push(format!("read -P 0 {} {}", 64 << 10, (1 << 20) - (64 << 10)));
        reads.push(format!("read -P 0 {} 512", 3 << 20));
        let (good, text) = qemu_io(&uri, &reads)?;
        if !good {
            return Err(format!("qemu-io pattern verification: {text}"));
        }
        // The primary's /metrics counted them: four writes and a flush at least (qemu-io may
        // split or add requests, never remove them).
        let (p1, _) = self.primary("v1")?;
        let text = http_get(&self.server(&p1)?.http, "/metrics").map_err(|e| e.to_string())?;
        let count = |name: &str| -> u64 {
            let key = format!("{name}{{volume=\"v1\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let (w, f, r) = (
            count("swblock_write_latency_seconds_count"),
            count("swblock_flush_latency_seconds_count"),
            count("swblock_read_latency_seconds_count"),
        );
        if w < 4 || f < 1 || r < 6 {
            return Err(format!(
                "/metrics counted {w} writes, {f} flushes, {r} reads: {text}"
            ));
        }
        let bytes = writes.iter().map(|w| w.1 as u64).sum::<u64>() * 2;
        Ok(found(
            "4 patterns written, flushed, read back",
            "qemu-io nbd://",
            bytes,
        ))
    }

    fn roundtrip(&mut self) -> Result<Found, Error> {
        let (_, uri) = self.primary("v1")?;
        let image = random_bytes(V1_BYTES, 0x5eed);
        let src = self.dir.join("image.raw");
        std::fs::write(&src, &image).map_err(|e| e.to_string())?;
        // qemu-img flushes at the end: the image is acknowledged durable under sync_all.
        ok(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri))?;
        let _ = std::fs::remove_file(&src);
        self.v1 = image;
        self.read_back(&uri, &self.v1, "roundtrip")?;
        Ok(found(
            "64 MiB in and out, equal",
            "qemu-img convert nbd://",
            2 * V1_BYTES as u64,
        ))
    }

    fn sync_all_refuses(&mut self) -> Result<Found, Error> {
        let (p1, uri1) = self.primary("v1")?;
        let (p2, _) = self.primary("v2")?;
        // A server that is a replica of both volumes.
        let victim = self
            .info
            .servers
            .iter()
            .find(|s| s.id != p1 && s.id != p2)
            .cloned()
            .ok_or("every server is a primary")?;
        let victim = self.server(&victim.id)?;
        self.kill9(&victim)?;
        self.down_replica = Some(victim.clone());
        // The write lands on the primary; its flush cannot be proved on every replica.
        let (good, text) = qemu_io(&uri1, &["write -P 0x7e 2M 64k".into(), "flush".into()])?;
        if good {
            return Err(format!(
                "a sync_all flush was acknowledged with replica {} down: {text}",
                victim.id
            ));
        }
        // Not acknowledged, so not in the oracle yet; it is written again (and flushed)
        // once every replica is back.
        Ok(found(
            format!("flush refused with {} down", victim.id),
            "qemu-io write+flush, EIO",
            64 << 10,
        )
        .uncompared())
    }

    fn replica_catch_up(&mut self) -> Result<Found, Error> {
        let victim = self.down_replica.clone().ok_or("no replica is down")?;
        let (p2, uri2) = self.primary("v2")?;
        // sync_quorum: the primary and one of two replicas make a majority of three.
        let mut cmds = Vec::new();
        for i in 0..8usize {
            cmds.push(format!("write -P {:#x} {} 256k", 0x30 + i, i << 20));
            cmds.push("flush".into());
        }
        let (good, text) = qemu_io(&uri2, &cmds)?;
        if !good {
            return Err(format!("sync_quorum writes with one replica down: {text}"));
        }
        for i in 0..8usize {
            put(&mut self.v2, i << 20, 256 << 10, 0x30 + i as u8);
        }
        let back = self.restart(&victim.id)?;
        let primary = self.server(&p2)?;
        let st = self.wait_in_sync(&primary, "v2")?;
        let rep = st["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == format!("v2/{}", victim.id))
            .cloned()
            .ok_or_else(|| format!("v2's primary does not list {}: {st}", victim.id))?;
        let path = rep["last_path"].as_str().unwrap_or_default().to_owned();
        if path != "catch_up" || rep["recoveries"]["rebuild"] != 0 {
            return Err(format!(
                "the returning replica joined by {path:?}, not a catch-up: {rep}"
            ));
        }
        let want = blockvol::Digest::of_image(&self.v2).0;
        let (d_back, d_primary) = (self.digest(&back, "v2")?, self.digest(&primary, "v2")?);
        if d_back != want || d_primary != want {
            return Err(format!(
                "v2 digests: returned replica {}, primary {}, oracle {}",
                hex(&d_back),
                hex(&d_primary),
                hex(&want)
            ));
        }
        // v1's copy on it came back too: the refused write can be acknowledged now.
        let (_, uri1) = self.primary("v1")?;
        wait_until(
            "a sync_all flush on v1 with every replica back",
            Duration::from_secs(60),
            || Ok(qemu_io(&uri1, &["write -P 0x7e 2M 64k".into(), "flush".into()])?.0),
        )?;
        put(&mut self.v1, 2 << 20, 64 << 10, 0x7e);
        Ok(found(
            format!("{} caught up to the primary's digest", victim.id),
            "kill -9 replica, sync_quorum writes, restart, catch_up",
            8 * (256 << 10),
        ))
    }

    fn failover(&mut self) -> Result<Found, Error> {
        let (p1, _) = self.primary("v1")?;
        let before = self.epoch("v1")?;
        let victim = self.server(&p1)?;
        self.kill9(&victim)?;
        self.victim = Some(victim);
        let mut new = (String::new(), String::new());
        wait_until("a promotion", Duration::from_secs(40), || {
            new = self.primary("v1")?;
            Ok(new.0 != p1 && !new.1.is_empty())
        })?;
        self.wait_serving(&new.1)?;
        self.read_back(&new.1, &self.v1, "failover")?;
        let after = self.epoch("v1")?;
        if after <= before {
            return Err(format!("promotion kept epoch {before} (now {after})"));
        }
        // `block status`: the new primary leased at the new epoch, the old one unreachable.
        let st = self.status("v1")?;
        let copies = st["copies"].as_array().cloned().unwrap_or_default();
        let copy = |id: &str| copies.iter().find(|c| c["server"] == id).cloned();
        let np = copy(&new.0).ok_or_else(|| format!("status lists no {}: {st}", new.0))?;
        if np["status"]["role"] != "primary"
            || np["status"]["epoch"].as_u64() != Some(after)
            || np["status"]["has_lease"] != true
        {
            return Err(format!("the promoted copy's status: {np}"));
        }
        let old = copy(&p1).ok_or_else(|| format!("status lists no {p1}: {st}"))?;
        if !old["status"].is_null() || old["alive"] != false {
            return Err(format!("the killed primary's status: {old}"));
        }
        Ok(found(
            format!("{p1} killed, {} promoted, epoch {before} -> {after}", new.0),
            "kill -9 primary, lease wait, promotion evidence",
            V1_BYTES as u64,
        ))
    }

    fn old_primary_returns(&mut self) -> Result<Found, Error> {
        let victim = self.victim.clone().ok_or("no old primary")?;
        let (p1, uri1) = self.primary("v1")?;
        let back = self.restart(&victim.id)?;
        // sync_all: the write is durable only once the old primary is back in the stream.
        wait_until(
            "a durable write on the new primary",
            Duration::from_secs(60),
            || Ok(qemu_io(&uri1, &["write -P 0x6b 7M 64k".into(), "flush".into()])?.0),
        )?;
        put(&mut self.v1, 7 << 20, 64 << 10, 0x6b);
        let primary = self.server(&p1)?;
        let st = self.wait_in_sync(&primary, "v1")?;
        let rep = st["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == format!("v1/{}", victim.id))
            .cloned()
            .unwrap_or_default();
        let want = blockvol::Digest::of_image(&self.v1).0;
        let (d_back, d_primary) = (self.digest(&back, "v1")?, self.digest(&primary, "v1")?);
        if d_back != want || d_primary != want {
            return Err(format!(
                "v1 digests: old primary {}, new primary {}, oracle {}",
                hex(&d_back),
                hex(&d_primary),
                hex(&want)
            ));
        }
        Ok(found(
            format!("{} back under {p1}, identical", victim.id),
            format!(
                "restart old primary, {}",
                rep["last_path"].as_str().unwrap_or("?")
            ),
            rep["rebuild_bytes_sent"].as_u64().unwrap_or(0),
        ))
    }

    fn lease_expiry(&mut self) -> Result<Found, Error> {
        let (p1, uri1) = self.primary("v1")?;
        let epoch = self.epoch("v1")?;
        let info = ClusterInfo::load(&self.dir).map_err(|e| e.to_string())?;
        ok(Command::new("kill").args(["-9", &info.master_pid.to_string()]))?;
        wait_until("the master to die", Duration::from_secs(5), || {
            Ok(!alive(info.master_pid))
        })?;
        // No renewals: once the lease runs out the primary stops acknowledging writes.
        let start = Instant::now();
        wait_until(
            "writes to fail without a lease",
            Duration::from_secs(30),
            || Ok(!qemu_io(&uri1, &["write -P 0x11 9M 4k".into(), "flush".into()])?.0),
        )?;
        let refused_after = start.elapsed();
        ok(Command::new(&self.swblock)
            .args(["cluster", "restart", "--master", "--dir"])
            .arg(&self.dir))?;
        let (p_after, uri_after) = self.primary("v1")?;
        let epoch_after = self.epoch("v1")?;
        if p_after != p1 || epoch_after != epoch || uri_after != uri1 {
            return Err(format!(
                "the restarted master has v1 at {p_after} epoch {epoch_after} {uri_after:?}, \
                 was {p1} epoch {epoch} {uri1:?}"
            ));
        }
        wait_until(
            "writes to succeed once the lease is renewed",
            Duration::from_secs(60),
            || Ok(qemu_io(&uri1, &["write -P 0x12 9M 4k".into(), "flush".into()])?.0),
        )?;
        put(&mut self.v1, 9 << 20, 4 << 10, 0x12);
        let primary = self.server(&p1)?;
        self.wait_in_sync(&primary, "v1")?;
        let want = blockvol::Digest::of_image(&self.v1).0;
        let got = self.digest(&primary, "v1")?;
        if got != want {
            return Err(format!(
                "after the lease came back v1 is {} on the primary, oracle {}",
                hex(&got),
                hex(&want)
            ));
        }
        Ok(found(
            format!(
                "refused {:.1} s after master died; renewed",
                refused_after.as_secs_f64()
            ),
            "kill -9 master, lease expiry, master restart",
            8 << 10,
        ))
    }

    /// The last step: bytes flipped behind the servers' backs in every copy of v1 (a block's
    /// data on the primary and on one replica, a block's data and another's checksum on the
    /// other replica) are found by the servers' own scrubs and repaired from a good copy;
    /// every copy then holds the oracle's bytes.
    fn scrub_repair(&mut self) -> Result<Found, Error> {
        let (p1, uri1) = self.primary("v1")?;
        let primary = self.server(&p1)?;
        // Fresh data at 40 MiB, flushed, then one more write so the replicas learn the
        // commit and flush it to their extents too.
        let (good, text) = qemu_io(&uri1, &["write -P 0x5c 40M 64k".into(), "flush".into()])?;
        if !good {
            return Err(format!("qemu-io: {text}"));
        }
        put(&mut self.v1, 40 << 20, 64 << 10, 0x5c);
        let head = self.volume_status(&primary, "v1")?["head"]
            .as_u64()
            .unwrap_or(0);
        let (good, text) = qemu_io(&uri1, &["write -P 0x5d 41M 4k".into(), "flush".into()])?;
        if !good {
            return Err(format!("qemu-io: {text}"));
        }
        put(&mut self.v1, 41 << 20, 4 << 10, 0x5d);
        let st = self.wait_in_sync(&primary, "v1")?;
        let replicas: Vec<ServerEntry> = st["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["id"].as_str()?.split('/').nth(1).map(str::to_owned))
            .map(|id| self.server(&id))
            .collect::<Result<_, _>>()?;
        if replicas.len() != 2 {
            return Err(format!("v1 has {} replicas: {st}", replicas.len()));
        }
        let copies: Vec<&ServerEntry> = std::iter::once(&primary).chain(&replicas).collect();
        for c in &copies {
            wait_until(
                &format!("{}'s extent to hold LSN {head}", c.id),
                Duration::from_secs(30),
                || Ok(self.volume_status(c, "v1")?["checkpoint"].as_u64() >= Some(head)),
            )?;
        }
        let block = |off: u64| off / 4096;
        let (a, b, c) = (
            block(40 << 20),
            block((40 << 20) + 8192),
            block((40 << 20) + 16384),
        );
        let file = |s: &ServerEntry| s.data.join("v1.vol");
        let (ext, csum) = volume_layout(&file(&primary))?;
        // Block a: the primary and the second replica; block b: the first replica; block
        // c's checksum: the second replica. Every block keeps one good copy.
        flip_byte(&file(&primary), ext + a * 4096 + 11)?;
        flip_byte(&file(&replicas[1]), ext + a * 4096 + 4000)?;
        flip_byte(&file(&replicas[0]), ext + b * 4096)?;
        flip_byte(&file(&replicas[1]), csum + c * 4 + 2)?;
        let want_repaired = [(&primary, 1u64), (&replicas[0], 1), (&replicas[1], 2)];
        let mut last = String::new();
        wait_until(
            "the scrubs to repair every copy",
            Duration::from_secs(90),
            || {
                let mut done = true;
                last.clear();
                for (s, n) in want_repaired {
                    let v = self.volume_status(s, "v1")?;
                    let sc = &v["scrub"];
                    last.push_str(&format!("{}: {sc} ", s.id));
                    done &= sc["repaired"].as_u64() >= Some(n) && sc["damaged"] == 0;
                }
                Ok(done)
            },
        )
        .map_err(|e| format!("{e}; last {last}"))?;
        self.read_back(&uri1, &self.v1, "scrubbed")?;
        let want = blockvol::Digest::of_image(&self.v1).0;
        for s in &copies {
            let got = self.digest(s, "v1")?;
            if got != want {
                return Err(format!(
                    "after the repairs v1 is {} on {}, oracle {}",
                    hex(&got),
                    s.id,
                    hex(&want)
                ));
            }
        }
        Ok(found(
            format!("4 flipped bytes on 3 copies repaired by scrubs ({last})"),
            "scrub, ReadBlockReq/RepairReq, repair_block",
            3 * 4096,
        ))
    }
}

fn hex(d: &u128) -> String {
    format!("{d:032x}")
}

/// Runs the scenario with the `swblock` binary at `swblock`, in a fresh directory under
/// `work`; one report per step of [`STEPS`].
pub fn run(swblock: &Path, work: &Path) -> Vec<StepReport> {
    let dir = work.join("cluster");
    let mut reports = Vec::new();
    let start = Instant::now();
    let up = ok(Command::new(swblock)
        .args(["cluster", "up", "--servers", "3", "--scrub-interval-s"])
        .arg(SCRUB_INTERVAL_S.to_string())
        .arg("--dir")
        .arg(&dir))
    .and_then(|out| {
        serde_json::from_str::<ClusterInfo>(&out).map_err(|e| format!("cluster.json: {e}"))
    });
    let mut run = match up {
        Ok(info) => Run {
            swblock: swblock.to_path_buf(),
            dir: dir.clone(),
            master: info.master.clone(),
            info,
            v1: vec![0; V1_BYTES],
            v2: vec![0; V2_BYTES],
            down_replica: None,
            victim: None,
        },
        Err(e) => {
            // Whatever started is stopped.
            let _ = Command::new(swblock)
                .args(["cluster", "down", "--dir"])
                .arg(&dir)
                .output();
            return STEPS
                .iter()
                .map(|name| not_run(name, format!("cluster up: {e}"), start.elapsed()))
                .collect();
        }
    };
    let mut failed: Option<String> = None;
    for (i, name) in STEPS.iter().enumerate() {
        if let Some(why) = &failed {
            reports.push(not_run(name, format!("not run: {why}"), Duration::ZERO));
            continue;
        }
        let t = if i == 0 { start } else { Instant::now() };
        log::info!("cluster scenario: {name}");
        match run.step(name) {
            Ok(f) => reports.push(StepReport {
                name,
                outcome: f.outcome,
                path: f.path,
                bytes: f.bytes,
                digest_match: f.compared,
                passed: true,
                failure: None,
                elapsed: t.elapsed(),
            }),
            Err(e) => {
                failed = Some(format!("step {name} failed"));
                reports.push(not_run(name, e, t.elapsed()));
            }
        }
    }
    reports
}

fn not_run(name: &'static str, failure: String, elapsed: Duration) -> StepReport {
    StepReport {
        name,
        outcome: "failed".into(),
        path: String::new(),
        bytes: 0,
        digest_match: false,
        passed: false,
        failure: Some(failure),
        elapsed,
    }
}

/// Where the `swblock` binary is: `$SWBLOCK_BIN`, or next to (or above) the running
/// executable, as cargo lays out `target/<profile>/`.
pub fn swblock_path() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("SWBLOCK_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join("swblock");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(
        "swblock not found next to this executable: run `cargo build -p server --bin \
         swblock` or set SWBLOCK_BIN"
            .into(),
    )
}

/// The extent and checksum-region offsets of the volume file at `path` (format version 2).
pub fn volume_layout(path: &Path) -> Result<(u64, u64), Error> {
    use blockvol::format::{SB_SLOT_SIZE, Superblock, choose_superblock};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut img = vec![0u8; 2 * SB_SLOT_SIZE as usize];
    f.read_exact_at(&mut img, 0)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let a = Superblock::decode(&img[..SB_SLOT_SIZE as usize], 0);
    let b = Superblock::decode(&img[SB_SLOT_SIZE as usize..], SB_SLOT_SIZE);
    let sb = choose_superblock(&a, &b)
        .ok_or_else(|| format!("{}: no valid superblock", path.display()))?
        .1;
    Ok((sb.extent_offset, sb.csum_offset()))
}

/// Flips the byte at `offset` of `path` behind the server's back (media damage: the server
/// reads through the same page cache).
pub fn flip_byte(path: &Path, offset: u64) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)
        .and_then(|()| f.write_all_at(&[b[0] ^ 0x5A], offset))
        .map_err(|e| format!("{} at {offset}: {e}", path.display()))
}
