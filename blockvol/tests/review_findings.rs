//! The review's findings, each as the test that proved it (failing before its fix).
mod common;
use blockvol::{BlockVolError, CreateOptions, Lsn, Volume};
use common::{data, manual};

#[test]
fn f4_revoked_base_reader_ends_cleanly_with_a_wrong_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.bv");
    let o = CreateOptions {
        volume_size_bytes: 64 * 4096,
        wal_size_bytes: 1 << 20,
        block_size: 4096,
    };
    let v = Volume::create(&path, &o, &manual()).unwrap();
    v.write(32, &data(7, 32, 4096)).unwrap();
    assert_eq!(v.force_flush().unwrap(), Lsn(1));
    let pin = v.pin_base(Lsn(1)).unwrap();
    let mut r = pin.reader(16 * 4096);
    let c = r.next().unwrap().unwrap();
    assert_eq!((c.lba, c.blocks), (32, 16));
    v.trim(48, 16).unwrap();
    assert_eq!(v.revoke_wal_pins("pressure"), 2);
    assert_eq!(v.force_flush().unwrap(), Lsn(2));
    match r.next() {
        Some(Err(BlockVolError::Revoked { .. })) => {}
        Some(Ok(c)) => assert_eq!(c.lba, 48),
        Some(Err(e)) => panic!("unexpected error {e}"),
        None => {
            panic!("reader ended cleanly after revocation: blocks 48..64 missing from the image")
        }
    }
}
