//! A base reader over a real file reads only the blocks the file system holds data for and
//! skips the holes between them without filling, hashing or scanning them (D55). It must
//! ship exactly the blocks a reader that sees no holes ships: the same volume history on the
//! simulated disk (whose medium reports everything as data) is the oracle, for random
//! writes, zero blocks written on purpose, trims and chunk sizes. (A hole whose stored
//! checksum claims data is refused: `checksums.rs`.)

use blockvol::{BaseChunk, CreateOptions, FlushGate, Lba, OpenOptions, Volume};
use proptest::prelude::*;

const BS: usize = 4096;
const BLOCKS: u64 = 512;

fn opts() -> CreateOptions {
    CreateOptions {
        volume_size_bytes: BLOCKS * BS as u64,
        wal_size_bytes: 4 << 20,
        block_size: BS as u32,
    }
}

fn open() -> OpenOptions {
    OpenOptions {
        flush_gate: FlushGate::Durable,
        ..OpenOptions::manual()
    }
}

/// `(kind, lba, blocks, seed)`: 0-5 a write of `blocks` blocks of data, 6 a write of zeros,
/// 7 a trim.
fn apply(v: &Volume, ops: &[(u8, u64, u64, u8)]) {
    for &(kind, lba, blocks, seed) in ops {
        let lba = lba % (BLOCKS - blocks);
        match kind {
            0..=5 => {
                let data: Vec<u8> = (0..blocks as usize * BS)
                    .map(|i| ((i / 7) as u8).wrapping_add(seed) | 1)
                    .collect();
                v.write(Lba(lba), &data).expect("write");
            }
            6 => {
                v.write(Lba(lba), &vec![0u8; blocks as usize * BS])
                    .expect("write zeros");
            }
            _ => {
                v.trim(Lba(lba), blocks).expect("trim");
            }
        }
    }
    v.sync().expect("sync");
    v.set_committed(v.status().head);
    v.force_flush().expect("flush");
}

fn chunks(v: &Volume, chunk_bytes: usize) -> Vec<BaseChunk> {
    let pin = v.pin_base(v.status().head).expect("pin");
    pin.reader(chunk_bytes).map(|c| c.expect("chunk")).collect()
}

/// Every block the chunks carry, by LBA.
fn blocks_of(chunks: &[BaseChunk]) -> std::collections::BTreeMap<u64, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for c in chunks {
        for (i, b) in c.data.chunks(BS).enumerate() {
            assert!(
                out.insert(c.lba.0 + i as u64, b.to_vec()).is_none(),
                "block sent twice"
            );
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_reader_that_skips_holes_yields_the_chunks_of_one_that_reads_everything(
        ops in proptest::collection::vec((0u8..8, 0u64..BLOCKS, 1u64..40, any::<u8>()), 0..40),
        chunk_blocks in prop_oneof![Just(1usize), 1usize..20, Just(64), Just(256)],
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = Volume::create(dir.path().join("v.vol"), &opts(), &open()).expect("create");
        let (sim, _d) = Volume::create_sim(&opts(), &open()).expect("create sim");
        apply(&file, &ops);
        apply(&sim, &ops);
        // Chunks first: reading every block (a digest) puts the holes' zero pages in the page
        // cache, and the file system then reports them as data.
        let (a, b) = (chunks(&file, chunk_blocks * BS), chunks(&sim, chunk_blocks * BS));
        prop_assert_eq!(file.digest().expect("digest"), sim.digest().expect("digest"));
        // Windows may start elsewhere (a reader over a file skips a leading hole to the next
        // data), so chunks may split differently: the blocks they carry must be the same.
        prop_assert!(blocks_of(&a) == blocks_of(&b), "the chunks carry different blocks");
        for c in &a {
            prop_assert!(c.data.chunks(BS).all(|blk| blk.iter().any(|&x| x != 0)), "a zero block shipped");
        }
        // Installed, the chunks give the volume's image.
        let (r, _dr) = Volume::create_sim(&opts(), &open()).expect("create replica");
        r.assign(blockvol::Role::Replica, blockvol::Epoch(0)).ok();
        let pin = file.pin_base(file.status().head).expect("pin");
        let mut install = r.begin_base_install(pin.install_spec()).expect("begin");
        for c in &a {
            install.write_chunk(c).expect("write chunk");
        }
        install.finish().expect("finish");
        prop_assert_eq!(r.digest().expect("digest"), file.digest().expect("digest"));
    }
}
