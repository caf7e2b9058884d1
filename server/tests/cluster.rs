//! A local cluster of real processes (`swblock cluster up`: a development master and three
//! volume servers on loopback) driven by clients we did not write: `qemu-img` and `qemu-io`
//! through `nbd://`. A volume under `sync_all` takes a random image, is read back equal to the
//! byte, loses its primary to kill -9, fails over to a replica that holds every flushed write,
//! and brings the old primary back byte-identical.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use server::cluster::{ClusterInfo, alive, http_get};

fn swblock() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_swblock"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run a command")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Brings the cluster down when the test ends, passes or fails.
struct Up {
    dir: PathBuf,
    extra: Vec<std::process::Child>,
}

impl Drop for Up {
    fn drop(&mut self) {
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(swblock())
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

fn lookup(master: &str, name: &str) -> serde_json::Value {
    let out =
        ok(Command::new(swblock()).args(["block", "lookup", name, "--json", "--master", master]));
    serde_json::from_str(out.trim()).expect("lookup json")
}

fn random_image(path: &Path, bytes: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; bytes];
    for chunk in data.chunks_mut(8) {
        // xorshift: incompressible, different in every block.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, data).unwrap();
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_cluster_takes_an_image_fails_over_and_brings_the_old_primary_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let out = ok(Command::new(swblock())
        .args(["cluster", "up", "--servers", "3", "--dir"])
        .arg(&dir));
    let mut up = Up {
        dir: dir.clone(),
        extra: Vec::new(),
    };
    let info: ClusterInfo = serde_json::from_str(&out).expect("cluster up prints cluster.json");
    assert_eq!(info, ClusterInfo::load(&dir).unwrap());
    assert_eq!(info.servers.len(), 3);
    let m = info.master.clone();

    // A 64 MiB volume, three copies, sync_all.
    ok(Command::new(swblock()).args([
        "block", "create", "v1", "--size", "64M", "--rf", "3", "--mode", "sync_all", "--master", &m,
    ]));
    let l = lookup(&m, "v1");
    let uri = l["nbd_uri"].as_str().unwrap().to_owned();
    let primary = l["primary"].as_str().unwrap().to_owned();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{l}");
    assert_eq!(l["replicas"].as_array().unwrap().len(), 2, "{l}");
    // The primary serves once its assignment and lease arrived with a heartbeat.
    wait_until("the primary to serve", Duration::from_secs(20), || {
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &uri]))
            .status
            .success()
    });

    // A random image in, and back out equal to the byte (qemu-img flushes at the end).
    let image = tmp.path().join("image.raw");
    random_image(&image, 64 << 20, 0x5eed);
    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image)
        .arg(&uri));
    let back = tmp.path().join("back.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&image).unwrap(),
        "read back differs"
    );

    // kill -9 of the primary after the flushed writes: the master waits for its lease, then
    // promotes a replica holding every flushed write.
    let victim = info
        .servers
        .iter()
        .find(|s| s.id == primary)
        .unwrap()
        .clone();
    Command::new("kill")
        .args(["-9", &victim.pid.to_string()])
        .status()
        .unwrap();
    wait_until("the victim to die", Duration::from_secs(5), || {
        !alive(victim.pid)
    });
    let mut new_primary = String::new();
    let mut new_uri = String::new();
    wait_until("a promotion", Duration::from_secs(40), || {
        let l = lookup(&m, "v1");
        new_primary = l["primary"].as_str().unwrap_or_default().to_owned();
        new_uri = l["nbd_uri"].as_str().unwrap_or_default().to_owned();
        new_primary != primary && !new_uri.is_empty()
    });
    wait_until("the new primary to serve", Duration::from_secs(20), || {
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &new_uri]))
            .status
            .success()
    });
    let back2 = tmp.path().join("back2.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &new_uri])
        .arg(&back2));
    assert!(
        std::fs::read(&back2).unwrap() == std::fs::read(&image).unwrap(),
        "the promoted replica lost flushed writes"
    );

    // Under sync_all a replica that cannot be reached (the old primary, still in the set) means
    // no write is acknowledged as durable: the flush fails, it does not lie.
    let refused = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x7e 1M 64k",
        "-c",
        "flush",
        &new_uri,
    ]));
    assert!(
        !refused.status.success() || String::from_utf8_lossy(&refused.stdout).contains("error"),
        "a sync_all flush was acknowledged with a replica down: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    // The old primary restarts: it comes back as a replica of the new epoch, is caught up (or
    // rebuilt) by the new primary, and the write goes through.
    let mut child = Command::new(swblock())
        .args(["volume", "--id", &victim.id, "--data"])
        .arg(&victim.data)
        .args(["--master", &m])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("restarted.log")).unwrap())
        .spawn()
        .unwrap();
    let ready = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    up.extra.push(child);
    let restarted_repl = ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("repl="))
        .unwrap_or_else(|| panic!("ready line {ready:?}"))
        .to_owned();
    let new = info
        .servers
        .iter()
        .find(|s| s.id == new_primary)
        .unwrap()
        .clone();
    wait_until(
        "a durable write on the new primary",
        Duration::from_secs(60),
        || {
            let out = run(Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                "write -P 0x7e 1M 64k",
                "-c",
                "flush",
                &new_uri,
            ]));
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error")
        },
    );
    wait_until(
        "every replica streaming at the new primary's head",
        Duration::from_secs(60),
        || {
            let Ok(body) = http_get(&new.http, "/status") else {
                return false;
            };
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let vol = &v["volumes"][0];
            let head = vol["head"].as_u64().unwrap_or(0);
            let reps = vol["replicas"].as_array().cloned().unwrap_or_default();
            reps.len() == 2
                && reps
                    .iter()
                    .all(|r| r["state"] == "streaming" && r["durable"].as_u64() == Some(head))
        },
    );
    // The old primary's copy equals the new primary's bytes (digests over their replication
    // ports).
    let digest = |addr: &str| {
        let mut r = transport::net::RemoteReplica::connect(
            addr.parse().unwrap(),
            "v1",
            &transport::net::ClientConfig::default(),
        )
        .unwrap();
        r.probe(true).unwrap().digest.unwrap()
    };
    assert_eq!(
        digest(&restarted_repl),
        digest(&new.repl),
        "the old primary came back with other bytes"
    );
    let img = std::fs::read(&image).unwrap();
    let mut want = img.clone();
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0x7e);
    assert_eq!(
        digest(&new.repl),
        blockvol::Digest::of_image(&want).0,
        "the new primary's bytes are the image plus the last write"
    );
}
