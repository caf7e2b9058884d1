//! A real crash: a child process writes and syncs in a loop, reporting each acknowledged LSN on
//! stdout, and the parent kills it (SIGKILL) at an arbitrary point, then reopens the file and
//! checks that every acknowledged write is there and the contents are a prefix state. Only a
//! real process death shows what happens to mmap'd writes that were never msynced.
//!
//! This file has its own `main` (`harness = false`): the same executable is the parent and, with
//! `BLOCKVOL_CRASH_CHILD_PATH` set, the child. Running the steps in sequence also keeps other
//! threads from forking while a volume is open (a forked child briefly shares the file lock).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blockvol::{CreateOptions, FlusherMode, Lsn, OpenOptions, Volume};
use common::{Model, Op, data, manual};

const CHILD_ENV: &str = "BLOCKVOL_CRASH_CHILD_PATH";

fn geometry() -> CreateOptions {
    CreateOptions {
        volume_size_bytes: 256 * 4096,
        wal_size_bytes: 128 * 1024,
        block_size: 4096,
    }
}

/// The operation the workload performs at `lsn`: a pure function, so the parent can rebuild the
/// expected contents of any prefix.
fn op_at(lsn: u64) -> Op {
    let blocks = 1 + lsn % 3;
    let lba = (lsn * 7) % (256 - 3);
    if lsn.is_multiple_of(13) {
        Op::Trim { lba, blocks }
    } else {
        Op::Write {
            lba,
            data: data(lsn, blocks, 4096),
        }
    }
}

fn expected(head: u64) -> Model {
    let ops: Vec<Op> = (1..=head).map(op_at).collect();
    Model::at(&geometry(), &ops, head)
}

/// Runs the workload on `path` until `limit` LSNs exist or the process is killed, printing
/// "acked N" after every sync.
fn workload(path: &Path, limit: u64, report: &mut dyn Write) {
    let open = OpenOptions {
        flusher: FlusherMode::Background {
            interval: Duration::from_millis(1),
        },
        ..OpenOptions::default()
    };
    let v = Volume::open(path, &open).expect("child open");
    let mut lsn = v.status().head.0;
    while lsn < limit {
        lsn += 1;
        let got = match op_at(lsn) {
            Op::Write { lba, data } => v.write(lba, &data),
            Op::Trim { lba, blocks } => v.trim(lba, blocks),
            Op::Barrier => v.barrier(),
        }
        .expect("child write");
        assert_eq!(got, Lsn(lsn));
        let durable = v.sync().expect("child sync");
        writeln!(report, "acked {}", durable.0).expect("report");
        report.flush().expect("flush report");
    }
    v.close().expect("child close");
}

/// The workload run in-process to completion: the baseline the killed runs are compared with.
fn in_process_workload_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("inproc.vol");
    Volume::create(&path, &geometry(), &manual())
        .expect("create")
        .close()
        .expect("close");
    let mut sink = Vec::new();
    workload(&path, 120, &mut sink);
    assert_eq!(String::from_utf8_lossy(&sink).lines().count(), 120);
    let v = Volume::open(&path, &manual()).expect("reopen");
    assert_eq!(v.status().head, Lsn(120));
    assert_eq!(v.digest().expect("digest"), expected(120).digest());
}

fn killed_writer_process_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("killed.vol");
    Volume::create(&path, &geometry(), &manual())
        .expect("create")
        .close()
        .expect("close");
    let exe = std::env::current_exe().expect("test executable");
    let mut last_head = 0;
    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "process_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acked = 0;
        let mut seen = 0;
        // Kill after a number of acknowledgements that varies per round, so the kill lands at
        // different points of the write / sync / flush cycle.
        let kill_after = 60 + round * 37;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("acked ") {
                acked = n.parse().expect("lsn");
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        child.kill().expect("kill child");
        child.wait().expect("reap child");
        assert!(
            seen >= kill_after,
            "round {round}: the child stopped early after {seen} acks"
        );
        let v = Volume::open(&path, &manual()).expect("reopen after kill");
        let s = v.status();
        assert!(
            s.head.0 >= acked,
            "round {round}: head {} lost acknowledged lsn {acked}",
            s.head
        );
        assert!(s.head.0 >= last_head, "round {round}: head went backwards");
        assert!(s.checkpoint_trusted);
        assert_eq!(
            v.digest().expect("digest"),
            expected(s.head.0).digest(),
            "round {round}: contents are not the prefix at {}",
            s.head
        );
        last_head = s.head.0;
        v.close().expect("close");
    }
}

fn main() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        workload(Path::new(&path), u64::MAX, &mut std::io::stdout());
        return;
    }
    in_process_workload_completes();
    println!("test in_process_workload_completes ... ok");
    killed_writer_process_loses_no_acknowledged_write();
    println!("test killed_writer_process_loses_no_acknowledged_write ... ok");
}
