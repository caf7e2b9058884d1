//! The `blockvol` command line: create / write / read / check / info / dump-wal / digest round
//! trip, and `check` naming the damaged region of a corrupted file with exit code 1.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blockvol"))
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = bin();
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn blockvol");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("wait")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn create(path: &Path) {
    let p = path.to_str().expect("utf8 path");
    let o = run(
        &["create", p, "--size", "1048576", "--wal-size", "65536"],
        None,
    );
    assert!(
        o.status.success(),
        "create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn create_write_read_check_info_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = path.to_str().expect("utf8");
    create(&path);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let o = run(&["write", p, "--lba", "5", "--sync"], Some(&data));
    assert!(
        o.status.success(),
        "write: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&["read", p, "--lba", "5", "--blocks", "2"], None);
    assert!(o.status.success());
    assert_eq!(o.stdout, data);
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("clean"));
    assert!(text(&o).contains("1 entries verified"), "{}", text(&o));
    let o = run(&["info", p], None);
    assert!(o.status.success());
    assert!(
        text(&o).contains("256 blocks of 4096 bytes"),
        "{}",
        text(&o)
    );
    let o = run(&["info", p, "--json"], None);
    assert!(o.status.success());
    let j = text(&o);
    assert!(
        j.trim_start().starts_with('{') && j.trim_end().ends_with('}'),
        "{j}"
    );
    assert!(
        j.contains("\"block_size\":4096")
            && j.contains("\"head\":1")
            && j.contains("\"corrupt\":false"),
        "{j}"
    );
    let o = run(&["dump-wal", p, "--json"], None);
    assert!(o.status.success());
    assert!(
        text(&o).contains("\"lsn\":1,\"kind\":\"write\""),
        "{}",
        text(&o)
    );
    let o = run(&["dump-wal", p, "--from", "2"], None);
    assert!(o.status.success());
    assert!(text(&o).trim().is_empty());
    let o = run(&["digest", p], None);
    assert!(o.status.success());
    let mut image = vec![0u8; 1 << 20];
    image[5 * 4096..7 * 4096].copy_from_slice(&data);
    assert_eq!(
        text(&o).trim(),
        blockvol::Digest::of_image(&image).to_string()
    );
}

#[test]
fn check_exits_1_and_names_a_damaged_wal_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = path.to_str().expect("utf8");
    create(&path);
    for lba in ["0", "1", "2"] {
        let o = run(&["write", p, "--lba", lba, "--sync"], Some(&[0x33u8; 4096]));
        assert!(o.status.success());
    }
    // Damage the payload of the first entry (file offset 8192 + header). Later entries were
    // written after it was synced, so this is corruption, not a torn tail.
    let mut bytes = std::fs::read(&path).expect("read file");
    bytes[8192 + 64 + 100] ^= 0xFF;
    std::fs::write(&path, &bytes).expect("write file");
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("CORRUPT"), "{t}");
    assert!(
        t.contains("lsn 1") && t.contains("file offset 8192"),
        "check must say where: {t}"
    );
}

#[test]
fn check_exits_1_and_names_a_damaged_superblock_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = path.to_str().expect("utf8");
    create(&path);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[4096 + 20] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let o = run(&["check", p], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("superblock slot B (offset 4096): CORRUPT"),
        "{}",
        text(&o)
    );
}

#[test]
fn usage_and_io_errors_exit_2() {
    let o = run(&["check", "/nonexistent/blockvol/file"], None);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["frobnicate"], None);
    assert_eq!(o.status.code(), Some(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let p = path.to_str().expect("utf8");
    create(&path);
    // Not a whole block.
    let o = run(&["write", p, "--lba", "0"], Some(&[1u8; 100]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of the block size"));
    // Creating over an existing file is refused.
    let o = run(
        &["create", p, "--size", "1048576", "--wal-size", "65536"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
}
