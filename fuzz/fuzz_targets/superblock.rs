//! The superblock slot decoder. The first byte picks the mode: odd = the bytes as they are
//! (padded or cut to one slot); even = magic, version and CRC fixed up first so the fuzzer
//! reaches the field validation. A slot that decodes must re-encode to the same bytes, and
//! choosing between two slots never panics.
#![no_main]

use blockvol::format::{
    FORMAT_VERSION, SB_MAGIC, SB_OFF_CRC, SB_OFF_MAGIC, SB_OFF_VERSION, SB_SLOT_SIZE, Superblock,
    choose_superblock,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = Superblock::decode(rest, 0);
    let mut slot = rest.to_vec();
    slot.resize(SB_SLOT_SIZE as usize, 0);
    if mode & 1 == 0 {
        slot[SB_OFF_MAGIC..SB_OFF_MAGIC + 8].copy_from_slice(&SB_MAGIC);
        if mode & 2 == 0 {
            slot[SB_OFF_VERSION..SB_OFF_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        }
        let crc = crc32fast::hash(&slot[..SB_OFF_CRC]);
        slot[SB_OFF_CRC..SB_OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let a = Superblock::decode(&slot, 0);
    if let Ok(sb) = &a {
        assert_eq!(
            sb.encode(),
            slot,
            "decode then encode must give the same slot"
        );
        let _ = sb.file_len();
    }
    let b = Superblock::decode(&slot, SB_SLOT_SIZE);
    let _ = choose_superblock(&a, &b);
});
