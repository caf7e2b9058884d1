//! Running the real `blockvol` binary from tests: plain runs, runs bounded by a timeout (a
//! command that hangs fails the test instead of hanging it), and volume fixtures.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockvol::{Lba, Lsn, Volume};

use super::{data, manual, small};

/// A command for the `blockvol` binary built with the tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockvol"))
}

/// Runs `blockvol args`, feeding `stdin` (or an empty, closed stdin).
pub fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = bin();
    c.args(args);
    run_cmd(c, stdin, Duration::from_secs(120))
}

/// Runs `cmd` with `stdin`, killing it and failing the test if it has not exited within
/// `timeout`.
pub fn run_cmd(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn blockvol");
    let input = stdin.map(<[u8]>::to_vec);
    let mut pipe = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        if let Some(input) = input {
            // The child may exit without reading everything: a broken pipe is its business.
            let _ = pipe.write_all(&input);
        }
        drop(pipe);
    });
    let out = wait_bounded(child, timeout, &format!("{cmd:?}"));
    let _ = feeder.join();
    out
}

/// Waits for `child` (stdout and stderr piped), collecting its output; kills it and panics
/// after `timeout`.
pub fn wait_bounded(mut child: Child, timeout: Duration, what: &str) -> Output {
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?} (hung); killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    }
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// `blockvol create` with the `small()` geometry: 1 MiB of 4 KiB blocks, a 64 KiB WAL.
pub fn create(path: &Path) {
    let o = run(
        &[
            "create",
            s(path),
            "--size",
            "1048576",
            "--wal-size",
            "65536",
        ],
        None,
    );
    assert!(o.status.success(), "create: {}", stderr(&o));
}

/// A volume file (the `small()` geometry) whose WAL holds entries 1..=3 (one block each at lba
/// 1, 2, 3, data tags 1..=3), synced but never flushed or closed, followed by a torn tail:
/// entry 4 (lba 4) was appended after the sync and its payload is damaged. Recovery keeps
/// 1..=3, discards 4 (a torn tail, not corruption) and, on a read-write open, zeroes its header
/// and writes a superblock.
pub fn torn_tail_volume(path: &Path) {
    let o = small();
    let v = Volume::create(path, &o, &manual()).expect("create");
    for lba in 1..=3u64 {
        v.write(Lba(lba), &data(lba, 1, o.block_size))
            .expect("write");
    }
    v.sync().expect("sync");
    v.write(Lba(4), &data(4, 1, o.block_size)).expect("write 4");
    let off = v.entry_file_offset(Lsn(4)).expect("offset of entry 4");
    // No close: the superblock still says checkpoint 0, and the mapped ring bytes are in the
    // page cache, so the file holds them.
    drop(v);
    damage(path, off + 64 + 100);
    wait_unlocked(path);
}

/// A volume file (the `small()` geometry) with a corrupt log: entries 1..=3 (lba 1, 2, 3), each
/// synced before the next was written, then entry 2's payload damaged. Entry 3's durable hint
/// proves entry 2 had been synced.
pub fn corrupt_log_volume(path: &Path) {
    let o = small();
    let v = Volume::create(path, &o, &manual()).expect("create");
    for lba in 1..=3u64 {
        v.write(Lba(lba), &data(lba, 1, o.block_size))
            .expect("write");
        v.sync().expect("sync");
    }
    let off = v.entry_file_offset(Lsn(2)).expect("offset of entry 2");
    drop(v);
    damage(path, off + 64 + 100);
    wait_unlocked(path);
}

/// Waits until nothing holds the volume's lock. A volume opened in the test process is locked
/// with `flock`, and a child another test thread is starting at that moment holds a copy of
/// the descriptor until its `exec` closes it (close-on-exec): the lock can outlive the
/// volume's drop for a moment, and a command run on the file then would find it locked.
pub fn wait_unlocked(path: &Path) {
    let f = std::fs::File::open(path).expect("open to test the lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f.try_lock() {
            Ok(()) => {
                f.unlock().expect("unlock");
                return;
            }
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{} stays locked: {e:?}", path.display()),
        }
    }
}

/// Flips every bit of the byte at `off`.
pub fn damage(path: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for damage");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read byte");
    b[0] ^= 0xFF;
    f.write_all_at(&b, off).expect("write byte");
}
