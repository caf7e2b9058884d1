//! The WAL entry wire decoders (`WalEntry::decode`, `decode_prefix`) and the header decoder
//! behind both the ring and the wire. The first byte picks the mode: odd = the bytes as they
//! are; even = the rest is a header plus payload whose two CRCs are recomputed first, so the
//! fuzzer reaches the field checks behind the checksums. Anything decoded must re-encode to
//! exactly the bytes it came from.
#![no_main]

use blockvol::WalEntry;
use blockvol::format::{
    ENTRY_HEADER_SIZE, ENTRY_MAGIC_DISK, ENTRY_MAGIC_WIRE, ENTRY_OFF_BLOCKS, ENTRY_OFF_CONTENT_CRC,
    ENTRY_OFF_HEADER_CRC, ENTRY_OFF_KIND, ENTRY_OFF_LBA, ENTRY_OFF_MAGIC, ENTRY_OFF_PAYLOAD_LEN,
    EntryHeader, KIND_WRITE, content_crc,
};
use libfuzzer_sys::fuzz_target;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn fix_up(b: &mut [u8]) {
    if b.len() < ENTRY_HEADER_SIZE {
        return;
    }
    b[ENTRY_OFF_MAGIC..ENTRY_OFF_MAGIC + 4].copy_from_slice(&ENTRY_MAGIC_WIRE);
    let kind = b[ENTRY_OFF_KIND];
    let lba = u64::from_le_bytes(b[ENTRY_OFF_LBA..ENTRY_OFF_LBA + 8].try_into().expect("8"));
    let blocks = u32_at(b, ENTRY_OFF_BLOCKS);
    let len = u32_at(b, ENTRY_OFF_PAYLOAD_LEN) as usize;
    let end = (ENTRY_HEADER_SIZE + len).min(b.len());
    let count = if kind == KIND_WRITE {
        len as u64
    } else {
        u64::from(blocks)
    };
    let crc = content_crc(kind, lba, count, &b[ENTRY_HEADER_SIZE..end]);
    b[ENTRY_OFF_CONTENT_CRC..ENTRY_OFF_CONTENT_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    let h = crc32fast::hash(&b[..ENTRY_OFF_HEADER_CRC]);
    b[ENTRY_OFF_HEADER_CRC..ENTRY_OFF_HEADER_CRC + 4].copy_from_slice(&h.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 0 {
        fix_up(&mut b);
    }
    let _ = EntryHeader::decode(&b, ENTRY_MAGIC_DISK);
    let _ = EntryHeader::decode(&b, ENTRY_MAGIC_WIRE);
    if let Ok((e, used)) = WalEntry::decode_prefix(&b) {
        assert!(used <= b.len());
        let again = e.encode().expect("a decoded entry encodes");
        assert_eq!(
            again,
            b[..used],
            "decode then encode must give the same bytes"
        );
        assert_eq!(e.encoded_len(), used);
    }
    if let Ok(e) = WalEntry::decode(&b) {
        assert_eq!(e.encode().expect("encode"), b);
    }
});
