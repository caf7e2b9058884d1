//! The `blockvol` command line as an operator uses it, on the files an operator has: sparse
//! copies, full file systems, read-only files, endless pipes, directories, FIFOs, truncated
//! files, corrupt logs, nonsensical arguments. Every test runs the real binary.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blockvol::Digest;
use common::cli::{
    bin, corrupt_log_volume, create, run, run_cmd, s, stderr, stdout, torn_tail_volume,
    wait_bounded,
};
use common::data;

/// File length of a `create` volume: superblocks, 64 KiB WAL, 1 MiB extent.
/// Superblocks, a 64 KiB WAL, a 1 MiB extent of 4 KiB blocks and its checksum region (256
/// checksums of 4 bytes: one page).
const FILE_LEN: u64 = 8192 + 65536 + 1048576 + 4096;
const BS: u32 = 4096;

fn block(tag: u64) -> Vec<u8> {
    data(tag, 1, BS)
}

// ---- 1. Sparse volume files ------------------------------------------------------------------

/// Copies `src` to `dst` leaving every all-zero 4 KiB block a hole, as `cp --sparse=always`
/// does.
fn sparse_copy(src: &Path, dst: &Path) {
    let bytes = std::fs::read(src).expect("read source");
    let f = std::fs::File::create(dst).expect("create copy");
    for (i, chunk) in bytes.chunks(4096).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, (i * 4096) as u64)
                .expect("copy block");
        }
    }
    f.set_len(bytes.len() as u64).expect("set length");
    f.sync_all().expect("sync copy");
}

/// `(allocated bytes, length)` of a file.
fn allocation(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("stat");
    (m.blocks() * 512, m.len())
}

#[test]
fn cli_write_on_a_sparse_copy_allocates_the_whole_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.vol");
    create(&src);
    let o = run(&["write", s(&src), "--lba", "3", "--sync"], Some(&block(3)));
    assert!(o.status.success(), "write: {}", stderr(&o));
    let dst = dir.path().join("sparse.vol");
    sparse_copy(&src, &dst);
    let (alloc, len) = allocation(&dst);
    if alloc >= len {
        eprintln!("skipped: this file system stored the sparse copy without holes");
        return;
    }
    let o = run(&["write", s(&dst), "--lba", "7"], Some(&block(7)));
    assert!(o.status.success(), "write on a sparse copy: {}", stderr(&o));
    let (alloc, len) = allocation(&dst);
    assert!(
        alloc >= len,
        "after a read-write open the volume file still has holes: {alloc} of {len} bytes allocated"
    );
    for (lba, tag) in [("3", 3), ("7", 7)] {
        let o = run(&["read", s(&dst), "--lba", lba, "--blocks", "1"], None);
        assert!(o.status.success(), "read: {}", stderr(&o));
        assert_eq!(o.stdout, block(tag), "lba {lba}");
    }
}

/// A tmpfs mounted for one test; unmounted when dropped (also when the test panics).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Mounts a tmpfs of `size` at `dir`, or says why not (not root, no mount permission).
fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    let r = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output();
    match r {
        Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "skipped: cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("skipped: cannot run mount: {e}");
            None
        }
    }
}

#[test]
fn cli_write_on_a_sparse_copy_in_a_full_file_system_fails_with_no_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.vol");
    create(&src);
    let o = run(&["write", s(&src), "--lba", "3", "--sync"], Some(&block(3)));
    assert!(o.status.success(), "write: {}", stderr(&o));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    // Dropped before `dir`: unmounted before the directory is removed.
    let Some(_mount) = mount_tmpfs(&mnt, "512k") else {
        return;
    };
    let dst = mnt.join("sparse.vol");
    sparse_copy(&src, &dst);
    // Fill the file system: the holes can no longer be backed by blocks.
    {
        let f = std::fs::File::create(mnt.join("filler")).expect("filler");
        let chunk = vec![0x55u8; 4096];
        let mut off = 0u64;
        while f.write_all_at(&chunk, off).is_ok() {
            off += 4096;
        }
    }
    let before = std::fs::read(&dst).expect("read copy");
    let mut c = bin();
    c.args(["write", s(&dst), "--lba", "7"]);
    let o = run_cmd(c, Some(&block(7)), Duration::from_secs(60));
    assert_eq!(
        o.status.code(),
        Some(2),
        "a write to a sparse volume on a full file system must fail with an error, not a \
         signal (SIGBUS is a fault on a hole): status {:?}, stderr {}",
        o.status,
        stderr(&o)
    );
    assert!(stderr(&o).contains("no space"), "{}", stderr(&o));
    assert!(
        std::fs::read(&dst).expect("read copy") == before,
        "the refused open changed the file"
    );
    // Inspection does not need the holes filled.
    let o = run(&["read", s(&dst), "--lba", "3", "--blocks", "1"], None);
    assert!(o.status.success(), "read: {}", stderr(&o));
    assert_eq!(o.stdout, block(3));
}

// ---- 2. The WAL stays usable -----------------------------------------------------------------

#[test]
fn cli_writes_keep_the_wal_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = s(&path);
    create(&path);
    // A 64 KiB WAL holds 15 one-block entries; write three times as many.
    let n = 48u64;
    let mut want = Vec::new();
    for i in 0..n {
        let b = block(100 + i);
        let o = run(&["write", p, "--lba", &i.to_string()], Some(&b));
        assert!(o.status.success(), "write {} of {n}: {}", i + 1, stderr(&o));
        want.extend_from_slice(&b);
    }
    let o = run(&["read", p, "--lba", "0", "--blocks", &n.to_string()], None);
    assert!(o.status.success(), "read: {}", stderr(&o));
    assert!(o.stdout == want, "the data does not read back");
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

// ---- 3. Inspection is read-only --------------------------------------------------------------

#[test]
fn cli_inspection_never_writes_read_only_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A volume written through the command line and closed cleanly, and one with synced but
    // unflushed entries followed by a torn tail that a read-write recovery would zero.
    let clean = dir.path().join("clean.vol");
    create(&clean);
    for lba in 1..=3u64 {
        let o = run(
            &["write", s(&clean), "--lba", &lba.to_string(), "--sync"],
            Some(&block(lba)),
        );
        assert!(o.status.success(), "write: {}", stderr(&o));
    }
    let torn = dir.path().join("torn.vol");
    torn_tail_volume(&torn);
    let mut image = vec![0u8; 1 << 20];
    for lba in 1..=3usize {
        image[lba * 4096..(lba + 1) * 4096].copy_from_slice(&block(lba as u64));
    }
    let digest = Digest::of_image(&image).to_string();
    for path in [&clean, &torn] {
        let p = s(path);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        let before = std::fs::read(path).expect("read file");
        let cmds: [&[&str]; 7] = [
            &["info", p],
            &["info", p, "--json"],
            &["check", p],
            &["dump-wal", p],
            &["dump-wal", p, "--json"],
            &["read", p, "--lba", "0", "--blocks", "5"],
            &["digest", p],
        ];
        for args in cmds {
            let o = run(args, None);
            assert!(
                o.status.success(),
                "{args:?} on a read-only file: {}{}",
                stdout(&o),
                stderr(&o)
            );
            assert!(
                std::fs::read(path).expect("read file") == before,
                "{args:?} changed the file"
            );
            match args[0] {
                "read" => assert!(o.stdout == image[..5 * 4096], "{args:?}: wrong data"),
                "digest" => assert_eq!(stdout(&o).trim(), digest, "{args:?}"),
                _ => {}
            }
        }
    }
}

// ---- 4. Bounded stdin ------------------------------------------------------------------------

#[test]
fn cli_write_bounds_its_read_of_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = s(&path);
    create(&path);
    // 256 blocks; a 64 KiB WAL takes writes of at most 7 blocks.
    for (lba, says) in [
        ("250", "does not fit"),
        ("0", "larger than the largest single write"),
        ("256", "outside the volume"),
    ] {
        let mut c = bin();
        c.args(["write", p, "--lba", lba])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn");
        let mut pipe = child.stdin.take().expect("stdin");
        // Up to 64 MiB, then the pipe stays open without an end: a command that reads its input
        // to the end never exits (and the timeout below fails the test), one that bounds its
        // read refuses the input and exits.
        let (stop, stopped) = mpsc::channel::<()>();
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            let chunk = vec![0xABu8; 65536];
            let mut sent = 0u64;
            while sent < 64 << 20 {
                if pipe.write_all(&chunk).is_err() {
                    return sent;
                }
                sent += chunk.len() as u64;
            }
            let _ = stopped.recv();
            sent
        });
        let o = wait_bounded(
            child,
            Duration::from_secs(30),
            &format!("write --lba {lba} with endless input"),
        );
        drop(stop);
        let sent = feeder.join().expect("feeder");
        assert_eq!(
            o.status.code(),
            Some(2),
            "--lba {lba}: {} {}",
            stdout(&o),
            stderr(&o)
        );
        assert!(stderr(&o).contains(says), "--lba {lba}: {}", stderr(&o));
        assert!(
            sent <= 1 << 20,
            "--lba {lba}: the command consumed {sent} bytes of input"
        );
    }
    // Exactly what fits is written.
    let six = data(9, 6, BS);
    let o = run(&["write", p, "--lba", "250"], Some(&six));
    assert!(o.status.success(), "write: {}", stderr(&o));
    let o = run(&["read", p, "--lba", "250", "--blocks", "6"], None);
    assert!(o.status.success() && o.stdout == six, "{}", stderr(&o));
}

// ---- 5. Errors are not corruption ------------------------------------------------------------

#[test]
fn cli_check_on_a_directory_is_an_error_not_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = s(dir.path());
    let cmds: [&[&str]; 5] = [
        &["check", d],
        &["info", d],
        &["dump-wal", d],
        &["read", d, "--lba", "0", "--blocks", "1"],
        &["digest", d],
    ];
    for args in cmds {
        let o = run(args, None);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {} {}",
            stdout(&o),
            stderr(&o)
        );
        assert!(
            stderr(&o).contains("is a directory"),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(!stdout(&o).contains("CORRUPT"), "{args:?}: {}", stdout(&o));
    }
}

#[test]
fn cli_help_documents_exit_codes() {
    for args in [
        &["--help"][..],
        &["check", "--help"],
        &["dump-wal", "--help"],
    ] {
        let o = run(args, None);
        assert!(o.status.success());
        let t = stdout(&o);
        assert!(t.contains("Exit codes"), "{args:?}: {t}");
        assert!(
            t.contains("0 ") && t.contains("1 ") && t.contains("2 "),
            "{args:?}: {t}"
        );
    }
}

// ---- 6. Truncated files, corrupt logs, FIFOs, arguments, create ------------------------------

#[test]
fn cli_refuses_a_fifo_instead_of_hanging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(st.success());
    let f = s(&fifo);
    let one = block(1);
    let cmds: [(&[&str], Option<&[u8]>); 6] = [
        (&["check", f], None),
        (&["info", f], None),
        (&["dump-wal", f], None),
        (&["read", f, "--lba", "0", "--blocks", "1"], None),
        (&["digest", f], None),
        (&["write", f, "--lba", "0"], Some(&one)),
    ];
    for (args, input) in cmds {
        let mut c = bin();
        c.args(args);
        let o = run_cmd(c, input, Duration::from_secs(10));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("not a regular file"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn cli_truncated_file_is_reported_as_shorter_than_its_geometry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = s(&path);
    create(&path);
    let o = run(&["write", p, "--lba", "1", "--sync"], Some(&block(1)));
    assert!(o.status.success(), "write: {}", stderr(&o));
    let short = FILE_LEN - 8192;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(short)
        .expect("truncate");
    let says = format!("file is {short} bytes, the superblock describes {FILE_LEN}");
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains(&says), "{}", stdout(&o));
    assert!(!stdout(&o).contains("install"), "{}", stdout(&o));
    let o = run(&["dump-wal", p], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&says), "dump-wal: {}", stderr(&o));
    for args in [
        &["read", p, "--lba", "0", "--blocks", "1"][..],
        &["digest", p],
        &["write", p, "--lba", "0"],
    ] {
        let o = run(args, Some(&block(5)));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(&says), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        short,
        "a refused open must not extend the file"
    );
}

#[test]
fn cli_dump_wal_warns_and_fails_on_a_corrupt_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("corrupt.vol");
    corrupt_log_volume(&bad);
    let o = run(&["dump-wal", s(&bad), "--json"], None);
    assert_eq!(o.status.code(), Some(1), "{} {}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("\"lsn\":1,") && !stdout(&o).contains("\"lsn\":2,"),
        "the good prefix is listed: {}",
        stdout(&o)
    );
    let e = stderr(&o);
    assert!(
        e.contains("corrupt") && e.contains("lsn 2") && e.contains("file offset 12352"),
        "dump-wal must say where and why the walk stopped: {e}"
    );
    let o = run(&["dump-wal", s(&bad)], None);
    assert_eq!(o.status.code(), Some(1), "{} {}", stdout(&o), stderr(&o));
    // A torn tail is how a log ends after a crash: listed, exit 0.
    let torn = dir.path().join("torn.vol");
    torn_tail_volume(&torn);
    let o = run(&["dump-wal", s(&torn), "--json"], None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("\"lsn\":3,") && !stdout(&o).contains("\"lsn\":4,"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn cli_rejects_zero_and_nonsensical_geometry_at_parsing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = s(&path);
    create(&path);
    let o = run(&["read", p, "--lba", "0", "--blocks", "0"], None);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("'0' for '--blocks") && e.contains("at least 1"),
        "{e}"
    );
    assert!(!e.contains("outside the volume"), "{e}");
    for (i, (flag, value)) in [
        ("--size", "0"),
        ("--wal-size", "0"),
        ("--wal-size", "1000"),
        ("--wal-size", "4096"),
        ("--block-size", "0"),
        ("--block-size", "1000"),
        ("--block-size", "131072"),
    ]
    .into_iter()
    .enumerate()
    {
        let q = dir.path().join(format!("bad{i}.vol"));
        let mut args = vec![
            "create",
            s(&q),
            "--size",
            "1048576",
            "--wal-size",
            "65536",
            "--block-size",
            "4096",
        ];
        let at = args.iter().position(|a| *a == flag).expect("flag") + 1;
        args[at] = value;
        let o = run(&args, None);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}");
        let e = stderr(&o);
        assert!(
            e.contains(&format!("'{value}' for '{flag}")),
            "{flag} {value}: {e}"
        );
        assert!(!q.exists(), "{flag} {value}: a file was created");
    }
}

/// Runs `blockvol args` in `dir` under strace; the trace of opens and syncs, or `None` when
/// strace is missing or cannot trace here.
fn strace(dir: &Path, args: &[&str]) -> Option<String> {
    let log = dir.join("strace.log");
    let o = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat,fsync,fdatasync", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_blockvol"))
        .args(args)
        .current_dir(dir)
        .output();
    let trace = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match o {
        Ok(o) if o.status.success() && trace.contains("open") => Some(trace),
        Ok(o) => {
            eprintln!(
                "skipped: strace cannot trace here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("skipped: strace is not available: {e}");
            None
        }
    }
}

/// Whether `trace` opens `dir` and later fsyncs that descriptor.
fn fsyncs_dir(trace: &str, dir: &str) -> bool {
    let mut fds = Vec::new();
    for line in trace.lines() {
        if line.contains("open") && line.contains(&format!("\"{dir}\"")) {
            if let Some(fd) = line
                .rsplit("= ")
                .next()
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<i64>().ok())
            {
                fds.push(fd);
            }
        } else if fds.iter().any(|fd| line.contains(&format!("fsync({fd})"))) {
            return true;
        }
    }
    false
}

#[test]
fn cli_create_fsyncs_the_directory_of_a_bare_file_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    for (path, parent) in [("vol.img", "."), ("sub/vol.img", "sub")] {
        let args = ["create", path, "--size", "1048576", "--wal-size", "65536"];
        let Some(trace) = strace(dir.path(), &args) else {
            return;
        };
        assert!(dir.path().join(path).exists(), "{path} was not created");
        assert!(
            fsyncs_dir(&trace, parent),
            "create {path} did not fsync the directory {parent:?}:\n{trace}"
        );
    }
}
