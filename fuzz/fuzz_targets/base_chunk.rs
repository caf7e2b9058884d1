//! The base chunk decoder. The first byte picks the mode: odd = as is; even = magic, length
//! and CRC fixed up so the fuzzer reaches what lies behind them. A decoded chunk verifies and
//! re-encodes to the same bytes.
#![no_main]

use blockvol::{BaseChunk, Lba};
use blockvol::format::{
    CHUNK_HEADER_SIZE, CHUNK_MAGIC, CHUNK_OFF_BLOCKS, CHUNK_OFF_CRC, CHUNK_OFF_DATA_LEN,
    CHUNK_OFF_LBA, CHUNK_OFF_MAGIC,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 0 && b.len() >= CHUNK_HEADER_SIZE {
        b[CHUNK_OFF_MAGIC..CHUNK_OFF_MAGIC + 4].copy_from_slice(&CHUNK_MAGIC);
        let len = (b.len() - CHUNK_HEADER_SIZE) as u32;
        if mode & 2 == 0 {
            b[CHUNK_OFF_DATA_LEN..CHUNK_OFF_DATA_LEN + 4].copy_from_slice(&len.to_le_bytes());
        }
        let lba = u64::from_le_bytes(b[CHUNK_OFF_LBA..CHUNK_OFF_LBA + 8].try_into().expect("8"));
        let blocks = u32::from_le_bytes(
            b[CHUNK_OFF_BLOCKS..CHUNK_OFF_BLOCKS + 4]
                .try_into()
                .expect("4"),
        );
        let crc = BaseChunk::new(Lba(lba), blocks, b[CHUNK_HEADER_SIZE..].to_vec()).crc;
        b[CHUNK_OFF_CRC..CHUNK_OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(c) = BaseChunk::decode(&b) {
        c.verify().expect("a decoded chunk verifies");
        assert_eq!(c.encode().expect("encode"), b);
    }
});
