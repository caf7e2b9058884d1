//! The `blockvol` command line as an operator uses it, on the files an operator has: sparse
//! copies, full file systems, read-only files, endless pipes, directories, FIFOs, truncated
//! files, corrupt logs, nonsensical arguments. Every test runs the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;

use blockvol::Digest;
use common::cli::{create, run, s, stderr, stdout, torn_tail_volume};
use common::data;

const BS: u32 = 4096;

fn block(tag: u64) -> Vec<u8> {
    data(tag, 1, BS)
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
