//! The copy-free wire paths give exactly what the entry and chunk paths give: a scan's
//! `next_encoded` is `WalEntry::encode_into` of what `next` yields, `apply_encoded` applies
//! like `apply` (same identity, same duplicate and divergence answers, same decode errors),
//! and a base reader's frames are its chunks' `encode`, installed by `write_frame` like
//! `write_chunk`.

use blockvol::{
    ApplyOutcome, BaseChunk, BlockVolError, CreateOptions, EntryKind, Epoch, FlushGate, Lba, Lsn,
    OpenOptions, Role, Volume, WalEntry,
};

fn opts() -> CreateOptions {
    CreateOptions {
        volume_size_bytes: 64 * 4096,
        wal_size_bytes: 1 << 20,
        block_size: 4096,
    }
}

fn open() -> OpenOptions {
    OpenOptions {
        flush_gate: FlushGate::Durable,
        ..OpenOptions::manual()
    }
}

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i.wrapping_mul(31) ^ seed) as u8 | 1)
        .collect()
}

/// A primary with writes (one and two blocks), a trim and a barrier.
fn primary() -> Volume {
    let (v, _d) = Volume::create_sim(&opts(), &open()).expect("create");
    for i in 0..20u64 {
        v.write(Lba(i % 50), &block(i)).expect("write");
    }
    let mut two = block(100);
    two.extend_from_slice(&block(101));
    v.write(Lba(60), &two).expect("write two blocks");
    v.trim(Lba(3), 4).expect("trim");
    v.barrier().expect("barrier");
    v.write(Lba(7), &block(7)).expect("write");
    v
}

#[test]
fn next_encoded_is_encode_of_next() {
    let v = primary();
    let entries: Vec<WalEntry> = v
        .scan_from(Lsn(1))
        .expect("scan")
        .map(|e| e.expect("entry"))
        .collect();
    let mut scan = v.scan_from(Lsn(1)).expect("scan");
    let mut frames = vec![0xEE]; // bytes already in the buffer stay
    let mut expected = vec![0xEE];
    for e in &entries {
        let info = scan
            .next_encoded(&mut frames)
            .expect("an entry")
            .expect("ok");
        assert_eq!(info, e.info());
        e.encode_into(&mut expected).expect("encode");
        assert_eq!(frames, expected, "lsn {}", e.lsn);
    }
    assert!(scan.next_encoded(&mut frames).is_none());
}

#[test]
fn apply_encoded_applies_like_apply() {
    let p = primary();
    let mut frames = Vec::new();
    let mut scan = p.scan_from(Lsn(1)).expect("scan");
    let mut n = 0;
    while let Some(r) = scan.next_encoded(&mut frames) {
        r.expect("ok");
        n += 1;
    }
    let (a, _da) = Volume::create_sim(&opts(), &open()).expect("create");
    let (b, _db) = Volume::create_sim(&opts(), &open()).expect("create");
    a.assign(Role::Replica, Epoch(1)).expect("assign");
    b.assign(Role::Replica, Epoch(1)).expect("assign");
    let mut rest = frames.as_slice();
    for _ in 0..n {
        let (e, used) = WalEntry::decode_prefix(rest).expect("decode");
        assert_eq!(b.apply(&e).expect("apply"), ApplyOutcome::Applied);
        let (outcome, used2) = a.apply_encoded(rest).expect("apply_encoded");
        assert_eq!((outcome, used2), (ApplyOutcome::Applied, used));
        assert_eq!(a.entry_info(e.lsn).expect("info"), e.info());
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    assert_eq!(a.digest().expect("digest"), b.digest().expect("digest"));
    assert_eq!(a.digest().expect("digest"), p.digest().expect("digest"));
    // A duplicate is acknowledged, a different entry at a held LSN is divergent.
    let (outcome, _) = a.apply_encoded(&frames).expect("duplicate");
    assert_eq!(outcome, ApplyOutcome::Duplicate);
    let other = WalEntry {
        lsn: Lsn(1),
        epoch: Epoch(1),
        kind: EntryKind::Write {
            lba: Lba(0),
            data: block(999),
        },
    }
    .encode()
    .expect("encode");
    assert!(matches!(
        a.apply_encoded(&other),
        Err(BlockVolError::Divergent { .. })
    ));
    // Damage is a decode error, as for `decode_prefix`, and changes nothing.
    let head = a.status().head;
    let mut bad = WalEntry {
        lsn: Lsn(head.0 + 1),
        epoch: Epoch(1),
        kind: EntryKind::Write {
            lba: Lba(1),
            data: block(5),
        },
    }
    .encode()
    .expect("encode");
    bad[100] ^= 1;
    assert!(matches!(
        a.apply_encoded(&bad),
        Err(BlockVolError::Decode { .. })
    ));
    assert!(a.apply_encoded(&bad[..70]).is_err());
    assert_eq!(a.status().head, head);
}

#[test]
fn base_frames_are_encoded_chunks_and_install_like_chunks() {
    let p = primary();
    p.force_flush().expect("flush");
    let head = p.status().head;
    let pin = p.pin_base(head).expect("pin");
    let chunks: Vec<BaseChunk> = pin.reader(3 * 4096).map(|c| c.expect("chunk")).collect();
    let mut reader = pin.reader(3 * 4096);
    let mut frames = Vec::new();
    while let Some(f) = reader.next_frame() {
        frames.push(f.expect("frame"));
    }
    assert_eq!(frames.len(), chunks.len());
    for (f, c) in frames.iter().zip(&chunks) {
        assert_eq!(f, &c.encode().expect("encode"));
    }
    let (r, _dr) = Volume::create_sim(&opts(), &open()).expect("create");
    r.assign(Role::Replica, Epoch(1)).expect("assign");
    let mut install = r.begin_base_install(pin.install_spec()).expect("begin");
    let mut bad = frames[0].clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    assert!(matches!(
        install.write_frame(&bad),
        Err(BlockVolError::ChunkChecksum { .. })
    ));
    for f in &frames {
        install.write_frame(f).expect("write_frame");
    }
    install.finish().expect("finish");
    assert_eq!(r.digest().expect("digest"), p.digest().expect("digest"));
}

#[test]
fn start_writeback_changes_nothing_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.vol");
    let v = Volume::create(&path, &opts(), &open()).expect("create");
    for i in 0..10u64 {
        v.write(Lba(i), &block(i)).expect("write");
    }
    let before = v.status();
    v.start_writeback();
    assert_eq!(v.status(), before, "a writeback hint makes nothing durable");
    assert_eq!(v.sync().expect("sync"), Lsn(10));
    drop(v);
    let v = Volume::open(&path, &open()).expect("reopen");
    assert_eq!(v.status().head, Lsn(10));
}
