//! The codec without sockets: every message survives a round trip; every truncation waits for
//! more bytes; every flipped bit is refused; arbitrary bytes never panic and never allocate past
//! the maximum; and `docs/wire.md` matches the code.

use blockvol::{EntryInfo, Geometry, Lsn};
use bytes::BytesMut;
use proptest::prelude::*;
use transport::wire::{
    Challenge, Close, DEFAULT_MAX_FRAME, Decoder, FEATURES, FrameType, HEADER_LEN, Hello,
    HistoryReply, ImageChunkReply, MAC_LEN, MAGIC, MAX_NODE_NAME, MAX_STRING, MAX_VOLUME_NAME,
    Message, NONCE_LEN, Nonce, PinWhat, ProbeReply, Reply, Request, VERSION, WireError, encode,
};
use v2bridge::{
    ApplyReply, ApplyRequest, BarrierReply, BarrierRequest, BaseBeginRequest, BaseChunkRequest,
    HandshakeReply, Lineage, TargetError, TruncateRequest,
};

fn lineage() -> Lineage {
    Lineage::new("primary-a", blockvol::Epoch(7), 42)
}

fn entry(lsn: u64) -> EntryInfo {
    EntryInfo {
        lsn: Lsn(lsn),
        epoch: blockvol::Epoch(3),
        content_crc: 0xDEAD_BEEF,
    }
}

/// A replica log: the floor 40 in epoch 2, epoch 3 from LSN 55.
fn sample_log() -> engine::ReplicaLog {
    engine::ReplicaLog::new(
        engine::Lsn(40),
        &[
            engine::EpochStart {
                epoch: engine::Epoch(2),
                first: engine::Lsn(31),
            },
            engine::EpochStart {
                epoch: engine::Epoch(3),
                first: engine::Lsn(55),
            },
        ],
    )
    .expect("valid log")
}

fn request(body: Request) -> Message {
    Message::Request {
        id: 9,
        volume: "vol-1".into(),
        body,
    }
}

fn reply(body: Reply) -> Message {
    Message::Reply { id: 9, body }
}

/// One message of every frame type.
fn samples() -> Vec<Message> {
    let l = lineage();
    vec![
        Message::Hello(Hello {
            version: VERSION,
            features: FEATURES,
            nonce: Nonce([7; NONCE_LEN]),
            node: "node-1".into(),
        }),
        Message::Challenge(Challenge {
            version: VERSION,
            features: FEATURES,
            nonce: Nonce([8; NONCE_LEN]),
            mac: [9; MAC_LEN],
            max_frame: DEFAULT_MAX_FRAME,
            window: 1 << 20,
        }),
        Message::Auth([5; MAC_LEN]),
        Message::Ready,
        Message::Close(Close {
            code: 2,
            reason: "wrong secret".into(),
        }),
        request(Request::Handshake),
        request(Request::Probe { digest: true }),
        request(Request::Apply(ApplyRequest {
            lineage: l,
            committed: Lsn(100),
            anchor: entry(70),
            count: 2,
            frames: vec![1, 2, 3, 4, 5],
        })),
        request(Request::Truncate(TruncateRequest {
            lineage: l,
            after: Lsn(100),
            committed: Lsn(100),
        })),
        request(Request::BaseBegin(BaseBeginRequest {
            lineage: l,
            base_lsn: Lsn(100),
            base_entry: entry(100),
            geometry: Geometry {
                block_size: 4096,
                volume_blocks: 256,
                wal_size_bytes: 4 << 20,
            },
        })),
        request(Request::BaseChunk(BaseChunkRequest {
            lineage: l,
            frame: vec![0xAA; 300],
        })),
        request(Request::BaseFinish(l)),
        request(Request::Barrier(BarrierRequest {
            lineage: l,
            target: Lsn(100),
            expected_tip: Some(entry(100)),
            committed: Lsn(100),
        })),
        reply(Reply::Handshake(HandshakeReply {
            head: Lsn(70),
            tip: entry(70),
            checkpoint: Lsn(40),
            epoch: blockvol::Epoch(3),
            install_incomplete: false,
            log: Some(Box::new(sample_log())),
        })),
        reply(Reply::Handshake(HandshakeReply {
            head: Lsn(0),
            tip: EntryInfo::ORIGIN,
            checkpoint: Lsn(0),
            epoch: blockvol::Epoch(1),
            install_incomplete: false,
            log: None,
        })),
        reply(Reply::Probe(ProbeReply {
            head: Lsn(70),
            checkpoint: Lsn(40),
            committed: Lsn(60),
            epoch: blockvol::Epoch(3),
            install_incomplete: true,
            digest: Some(u128::MAX - 5),
            pins: 3,
        })),
        reply(Reply::Apply(
            l,
            ApplyReply {
                applied_to: Lsn(100),
                applied: 30,
                duplicates: 0,
            },
        )),
        reply(Reply::Truncate(l, entry(100))),
        reply(Reply::Ack(l)),
        reply(Reply::BaseBegun(l, blockvol::Lba(4096))),
        reply(Reply::BaseFinish(l, Lsn(100))),
        reply(Reply::Barrier(
            l,
            BarrierReply {
                durable: Lsn(100),
                tip: entry(100),
            },
        )),
        reply(Reply::Error(
            Some(l),
            TargetError::Gap {
                expected: Lsn(71),
                found: Lsn(75),
            },
        )),
        request(Request::History),
        request(Request::EntryId(Lsn(50))),
        request(Request::Pin {
            what: PinWhat::FullBase,
            lsn: Lsn(100),
            lease_ms: 5000,
        }),
        request(Request::Renew { lease_ms: 5000 }),
        request(Request::Release(4)),
        request(Request::ReadWal {
            after: Lsn(70),
            want: 30,
        }),
        request(Request::ImageOpen {
            lease: 4,
            lsn: Lsn(100),
            from: blockvol::Lba(96),
        }),
        request(Request::ImageRead(1 << 20)),
        reply(Reply::History(HistoryReply {
            head: Lsn(120),
            tail: Lsn(40),
            committed: Lsn(100),
            checkpoint: Some(Lsn(40)),
            checkpoint_trusted: true,
            missing: vec![(Lsn(60), Lsn(65))],
        })),
        reply(Reply::EntryId(Some(entry(50)))),
        reply(Reply::Pinned {
            lease: 4,
            lsn: Lsn(100),
        }),
        reply(Reply::Done),
        reply(Reply::Wal {
            count: 2,
            frames: vec![9; 40],
        }),
        reply(Reply::ImageOpen {
            base_lsn: Lsn(100),
            base_entry: entry(100),
            geometry: Geometry {
                block_size: 4096,
                volume_blocks: 256,
                wal_size_bytes: 4 << 20,
            },
        }),
        reply(Reply::ImageChunk(ImageChunkReply {
            frame: Some(vec![1; 64]),
            scanned: 1 << 20,
            sent: 64,
        })),
        request(Request::Scrub {
            from: blockvol::Lba(512),
            count: 256,
        }),
        request(Request::ReadBlock(blockvol::Lba(7))),
        request(Request::Repair {
            lineage: lineage(),
            lba: blockvol::Lba(7),
            data: vec![3; 4096],
        }),
        reply(Reply::Scrub(blockvol::ScrubReport {
            checked: 250,
            skipped: 6,
            damaged: vec![blockvol::Lba(600), blockvol::Lba(701)],
        })),
        reply(Reply::Block(blockvol::Lba(7), vec![3; 4096])),
        reply(Reply::Repair(
            lineage(),
            blockvol::RepairOutcome::ChecksumRewritten,
        )),
    ]
}

fn encoded(msg: &Message) -> BytesMut {
    let mut out = BytesMut::new();
    encode(msg, DEFAULT_MAX_FRAME, &mut out).expect("encode");
    out
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, WireError> {
    let mut d = Decoder::new(DEFAULT_MAX_FRAME);
    d.feed(bytes);
    let mut out = Vec::new();
    while let Some(m) = d.next_message()? {
        out.push(m);
    }
    Ok(out)
}

#[test]
fn every_frame_type_round_trips() {
    let all = samples();
    let types: std::collections::BTreeSet<u8> = all.iter().map(|m| m.frame_type() as u8).collect();
    assert_eq!(types.len(), FrameType::ALL.len(), "a sample per frame type");
    let mut stream = BytesMut::new();
    for m in &all {
        stream.extend_from_slice(&encoded(m));
    }
    assert_eq!(decode_all(&stream).unwrap(), all);
}

#[test]
fn every_error_code_round_trips() {
    let errors = [
        TargetError::Fenced("old".into()),
        TargetError::Gap {
            expected: Lsn(1),
            found: Lsn(2),
        },
        TargetError::Divergent {
            lsn: Lsn(3),
            detail: "x".into(),
        },
        TargetError::BelowCheckpoint {
            requested: Lsn(4),
            checkpoint: Lsn(5),
        },
        TargetError::BelowCommitted {
            requested: Lsn(6),
            committed: Lsn(7),
        },
        TargetError::BadFrame("crc".into()),
        TargetError::Storage("eio".into()),
        TargetError::Protocol("order".into()),
        TargetError::Transport("reset".into()),
    ];
    for e in errors {
        let m = reply(Reply::Error(None, e));
        assert_eq!(decode_all(&encoded(&m)).unwrap(), vec![m]);
    }
}

#[test]
fn a_split_stream_decodes_the_same_and_a_prefix_waits_for_more() {
    let all = samples();
    let mut stream = BytesMut::new();
    for m in &all {
        stream.extend_from_slice(&encoded(m));
    }
    for split in [1, 3, 11, 12, 13, 97] {
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for piece in stream.chunks(split) {
            d.feed(piece);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all, "split {split}");
        assert!(!d.mid_frame());
    }
    // Any strict prefix of one frame is "more bytes needed", never an error.
    let one = encoded(&all[7]);
    for cut in 0..one.len() {
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        d.feed(&one[..cut]);
        assert_eq!(d.next_message(), Ok(None), "cut {cut}");
    }
}

#[test]
fn every_flipped_bit_is_refused() {
    for m in samples() {
        let frame = encoded(&m);
        for byte in 0..frame.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = frame.clone();
                bad[byte] ^= bit;
                let res = decode_all(&bad);
                // A flip in the length may leave the decoder waiting for bytes that never come
                // (the connection's frame deadline ends that); it never yields a message.
                match res {
                    Err(_) => {}
                    Ok(msgs) => assert!(
                        msgs.is_empty(),
                        "{} byte {byte} bit {bit:#x} decoded as {msgs:?}",
                        m.frame_type().name()
                    ),
                }
            }
        }
    }
}

#[test]
fn a_length_above_the_maximum_is_refused_from_the_header() {
    let frame = encoded(&request(Request::BaseChunk(BaseChunkRequest {
        lineage: lineage(),
        frame: vec![1; 5000],
    })));
    let mut d = Decoder::new(1024);
    d.feed(&frame[..HEADER_LEN]);
    assert!(matches!(
        d.next_message(),
        Err(WireError::FrameTooLarge { max: 1024, .. })
    ));
    // And a sender refuses to produce one.
    let mut out = BytesMut::new();
    let err = encode(
        &request(Request::BaseChunk(BaseChunkRequest {
            lineage: lineage(),
            frame: vec![1; 5000],
        })),
        1024,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(err, WireError::FrameTooLarge { .. }));
    assert!(out.is_empty(), "nothing appended for a refused frame");
}

#[test]
fn lying_fields_are_typed_errors() {
    // A byte string whose length runs past the frame.
    let mut frame = encoded(&request(Request::BaseChunk(BaseChunkRequest {
        lineage: lineage(),
        frame: vec![1; 10],
    })));
    let len_at = frame.len() - 10 - 4;
    frame[len_at..len_at + 4].copy_from_slice(&1_000_000u32.to_be_bytes());
    refresh_crc(&mut frame);
    assert!(matches!(
        decode_all(&frame),
        Err(WireError::Truncated { .. })
    ));
    // A zero lineage.
    let zero = encoded(&request(Request::BaseFinish(Lineage {
        epoch: blockvol::Epoch(0),
        session: 0,
        driver: 1,
    })));
    assert!(matches!(decode_all(&zero), Err(WireError::BadValue { .. })));
    // A volume name that could escape a directory.
    let bad = encoded(&Message::Request {
        id: 1,
        volume: "../etc".into(),
        body: Request::Handshake,
    });
    assert!(matches!(decode_all(&bad), Err(WireError::BadValue { .. })));
    // A handshake whose epoch list says more epochs than any replica sends (checked before
    // anything is read), and one whose epochs fall.
    let hs = encoded(&reply(Reply::Handshake(HandshakeReply {
        head: Lsn(70),
        tip: entry(70),
        checkpoint: Lsn(40),
        epoch: blockvol::Epoch(3),
        install_incomplete: false,
        log: Some(Box::new(sample_log())),
    })));
    // The list is the payload's last 8 + 1 + 2 x 16 bytes; the count is the byte after the
    // floor.
    let count_at = hs.len() - 2 * 16 - 1;
    let mut many = hs.clone();
    many[count_at] = 200;
    refresh_crc(&mut many);
    assert!(matches!(
        decode_all(&many),
        Err(WireError::BadValue {
            field: "handshake.log_epochs",
            ..
        })
    ));
    let mut falling = hs.clone();
    // The second epoch (3) becomes 1, below the first (2).
    let second_epoch_at = hs.len() - 16;
    falling[second_epoch_at..second_epoch_at + 8].copy_from_slice(&1u64.to_be_bytes());
    refresh_crc(&mut falling);
    assert!(matches!(
        decode_all(&falling),
        Err(WireError::BadValue {
            field: "handshake.log",
            ..
        })
    ));
    // Trailing bytes.
    let mut frame = encoded(&Message::Ready);
    frame.extend_from_slice(&[0]);
    frame[4..8].copy_from_slice(&1u32.to_be_bytes());
    refresh_crc(&mut frame);
    assert!(matches!(
        decode_all(&frame),
        Err(WireError::TrailingBytes { .. })
    ));
}

#[test]
fn scrub_and_repair_frames_are_bounded_before_anything_is_allocated() {
    let bad = |msg: &Message, patch: &dyn Fn(&mut BytesMut), field: &str| {
        let mut f = encoded(msg);
        patch(&mut f);
        refresh_crc(&mut f);
        match decode_all(&f) {
            Err(WireError::BadValue { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    };
    let scrub = request(Request::Scrub {
        from: blockvol::Lba(0),
        count: 1,
    });
    let n = encoded(&scrub).len();
    for count in [0u32, transport::wire::MAX_SCRUB_BLOCKS + 1, u32::MAX] {
        bad(
            &scrub,
            &|f: &mut BytesMut| f[n - 4..n].copy_from_slice(&count.to_be_bytes()),
            "scrub.count",
        );
    }
    // A reply claiming more damaged blocks than any request may name.
    let rep = reply(Reply::Scrub(blockvol::ScrubReport {
        checked: 1,
        skipped: 0,
        damaged: vec![blockvol::Lba(1)],
    }));
    let n = encoded(&rep).len();
    bad(
        &rep,
        &|f: &mut BytesMut| f[n - 12..n - 8].copy_from_slice(&u32::MAX.to_be_bytes()),
        "scrub.damaged",
    );
    let rep = reply(Reply::Repair(
        lineage(),
        blockvol::RepairOutcome::NotDamaged,
    ));
    let n = encoded(&rep).len();
    bad(&rep, &|f: &mut BytesMut| f[n - 1] = 9, "repair.outcome");
}

fn refresh_crc(frame: &mut [u8]) {
    let crc = crc32c_of(frame);
    frame[8..12].copy_from_slice(&crc.to_be_bytes());
}

/// CRC32C (Castagnoli, reflected 0x82F63B78), written out here as an independent oracle for
/// the codec's checksum.
fn crc32c_of(frame: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in frame[..8].iter().chain(&frame[HEADER_LEN..]) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn the_checksum_is_crc32c_over_the_header_and_payload() {
    for m in samples() {
        let frame = encoded(&m);
        let found = u32::from_be_bytes(frame[8..12].try_into().unwrap());
        assert_eq!(found, crc32c_of(&frame), "{}", m.frame_type().name());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes: an error or messages, never a panic, and never more buffered than one
    /// maximum frame plus what was fed.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut d = Decoder::new(256);
        d.feed(&bytes);
        while let Ok(Some(_)) = d.next_message() {}
        prop_assert!(d.buffered() <= bytes.len());
        // Whatever length a header claims, the decoder never reserves past one maximum frame
        // (256 here) plus the input, give or take the buffer's growth.
        prop_assert!(d.reserved() <= 4 * (HEADER_LEN + 256 + bytes.len()), "{}", d.reserved());
    }

    /// A valid header in front of arbitrary payload bytes exercises every payload parser.
    #[test]
    fn arbitrary_payloads_never_panic(
        kind in proptest::sample::select(FrameType::ALL.to_vec()),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut frame = vec![kind as u8, 0, 0, 0];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(&payload);
        refresh_crc(&mut frame);
        let _ = decode_all(&frame);
    }
}

/// The rows of the first markdown table under `heading` in docs/wire.md.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("docs/wire.md has no {heading:?}"));
    doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect()
}

fn wire_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/wire.md"))
        .expect("docs/wire.md")
}

#[test]
fn docs_wire_md_lists_every_frame_type_with_its_code() {
    let doc = wire_md();
    let rows = table(&doc, "## Frame types");
    let documented: Vec<(u8, String)> = rows
        .iter()
        .map(|r| {
            let code = u8::from_str_radix(r[0].trim_start_matches("0x"), 16).expect("hex code");
            (code, r[1].clone())
        })
        .collect();
    let code: Vec<(u8, String)> = FrameType::ALL
        .iter()
        .map(|t| (*t as u8, t.name().to_owned()))
        .collect();
    assert_eq!(documented, code);
}

#[test]
fn docs_wire_md_states_the_constants_the_code_uses() {
    let doc = wire_md();
    let rows = table(&doc, "Constants:");
    let get = |name: &str| -> String {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("constant {name} missing"))[1]
            .clone()
    };
    assert_eq!(get("magic").as_bytes(), MAGIC);
    assert_eq!(get("version"), VERSION.to_string());
    assert_eq!(get("header bytes"), HEADER_LEN.to_string());
    assert_eq!(
        get("default maximum frame payload"),
        DEFAULT_MAX_FRAME.to_string()
    );
    assert_eq!(get("nonce bytes"), NONCE_LEN.to_string());
    assert_eq!(get("MAC bytes"), MAC_LEN.to_string());
    assert_eq!(get("longest volume name"), MAX_VOLUME_NAME.to_string());
    assert_eq!(get("longest node name"), MAX_NODE_NAME.to_string());
    assert_eq!(
        get("largest frame before authentication"),
        transport::net::HANDSHAKE_MAX_FRAME.to_string()
    );
    assert_eq!(get("longest string"), MAX_STRING.to_string());
}

#[test]
fn docs_wire_md_lists_every_error_code() {
    let doc = wire_md();
    let rows = table(&doc, "## Error codes");
    assert_eq!(rows.len(), 9);
    for row in rows {
        let code: u8 = row[0].parse().unwrap();
        // Encode an error of the documented kind and check the code byte the codec wrote.
        let e = match row[1].as_str() {
            "Fenced" => TargetError::Fenced(String::new()),
            "Gap" => TargetError::Gap {
                expected: Lsn(0),
                found: Lsn(0),
            },
            "Divergent" => TargetError::Divergent {
                lsn: Lsn(0),
                detail: String::new(),
            },
            "BelowCheckpoint" => TargetError::BelowCheckpoint {
                requested: Lsn(0),
                checkpoint: Lsn(0),
            },
            "BelowCommitted" => TargetError::BelowCommitted {
                requested: Lsn(0),
                committed: Lsn(0),
            },
            "BadFrame" => TargetError::BadFrame(String::new()),
            "Storage" => TargetError::Storage(String::new()),
            "Protocol" => TargetError::Protocol(String::new()),
            "Transport" => TargetError::Transport(String::new()),
            other => panic!("undocumented error {other}"),
        };
        let frame = encoded(&reply(Reply::Error(None, e)));
        // reply id (8) + has_lineage (1), then the code.
        assert_eq!(frame[HEADER_LEN + 9], code, "{}", row[1]);
    }
}
