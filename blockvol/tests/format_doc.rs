//! Keeps docs/format.md true: every table row that names a constant must state the constant's
//! offset (and, where both are numeric, fields must tile their structure without gaps or
//! overlaps), and every "value (`CONSTANT`)" mention in the text must match the code.

use blockvol::format::*;

const DOC: &str = include_str!("../../docs/format.md");

fn value_of(name: &str) -> Option<u64> {
    macro_rules! table {
        ($($c:ident),* $(,)?) => {
            match name {
                $(stringify!($c) => Some($c as u64),)*
                _ => None,
            }
        };
    }
    table!(
        SB_SLOT_A_OFFSET,
        SB_SLOT_B_OFFSET,
        WAL_OFFSET,
        WAL_SIZE_ALIGN,
        MIN_WAL_SIZE,
        SB_OFF_MAGIC,
        SB_OFF_VERSION,
        SB_OFF_FLAGS,
        SB_OFF_SEQ,
        SB_OFF_VOLUME_ID,
        SB_OFF_BLOCK_SIZE,
        SB_OFF_RESERVED,
        SB_OFF_VOLUME_BLOCKS,
        SB_OFF_WAL_OFFSET,
        SB_OFF_WAL_SIZE,
        SB_OFF_EXTENT_OFFSET,
        SB_OFF_GENERATION,
        SB_OFF_CHECKPOINT,
        SB_OFF_TAIL_LSN,
        SB_OFF_TAIL_POS,
        SB_OFF_TAIL_EPOCH,
        SB_OFF_TAIL_CRC,
        SB_OFF_ROLE,
        SB_OFF_EPOCH,
        SB_OFF_HEAD_HINT,
        SB_OFF_INSTALL_LSN,
        SB_OFF_DURABLE_MARK,
        SB_OFF_FLUSH_MARK,
        SB_OFF_INSTALL_EPOCH,
        SB_OFF_INSTALL_CRC,
        SB_OFF_INSTALL_PAD,
        SB_OFF_INSTALL_RESUME,
        SB_FIELDS_END,
        SB_OFF_CRC,
        SB_COUNTER_LIMIT,
        ENTRY_OFF_MAGIC,
        ENTRY_OFF_KIND,
        ENTRY_OFF_FLAGS,
        ENTRY_OFF_RESERVED,
        ENTRY_OFF_GENERATION,
        ENTRY_OFF_LSN,
        ENTRY_OFF_EPOCH,
        ENTRY_OFF_LBA,
        ENTRY_OFF_BLOCKS,
        ENTRY_OFF_PAYLOAD_LEN,
        ENTRY_OFF_DURABLE_HINT,
        ENTRY_OFF_CONTENT_CRC,
        ENTRY_OFF_HEADER_CRC,
        ENTRY_HEADER_SIZE,
        ENTRY_ALIGN,
        MAX_ENTRY_SIZE,
        KIND_WRITE,
        KIND_TRIM,
        KIND_BARRIER,
        KIND_PADDING,
        CHUNK_OFF_MAGIC,
        CHUNK_OFF_BLOCKS,
        CHUNK_OFF_LBA,
        CHUNK_OFF_DATA_LEN,
        CHUNK_OFF_CRC,
        CHUNK_HEADER_SIZE,
        CSUM_SIZE,
        CSUM_REGION_ALIGN,
        MIN_FORMAT_VERSION,
        FORMAT_VERSION,
    )
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `(offset, size, constant)` rows, grouped by table.
fn tables() -> Vec<Vec<(u64, Option<u64>, String)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for line in DOC.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 3 {
            continue;
        }
        let (Some(off), Some(name)) = (
            parse_num(cells[0]),
            cells[2].strip_prefix('`').and_then(|c| c.strip_suffix('`')),
        ) else {
            continue;
        };
        cur.push((off, parse_num(cells[1]), name.to_string()));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn documented_offsets_match_the_code() {
    let tables = tables();
    let rows: usize = tables.iter().map(Vec::len).sum();
    assert!(
        rows >= 45,
        "expected the superblock, entry, chunk and region tables, found {rows} rows"
    );
    for t in &tables {
        for (off, _, name) in t {
            let v = value_of(name)
                .unwrap_or_else(|| panic!("docs/format.md names unknown constant {name}"));
            assert_eq!(
                *off, v,
                "docs/format.md says {name} is at {off}, the code says {v}"
            );
        }
        // Fields with numeric sizes tile their structure.
        for w in t.windows(2) {
            if let (Some(size), (next, _, nname)) = (w[0].1, &w[1]) {
                assert_eq!(
                    w[0].0 + size,
                    *next,
                    "docs/format.md: {} at {} size {size} does not end where {nname} starts",
                    w[0].2,
                    w[0].0
                );
            }
        }
    }
}

#[test]
fn documented_structure_sizes_match_the_code() {
    let find = |name: &str| {
        tables()
            .into_iter()
            .flatten()
            .find(|(_, _, n)| n == name)
            .unwrap_or_else(|| panic!("{name} is not documented"))
    };
    let (off, size, _) = find("SB_OFF_CRC");
    assert_eq!(off + size.expect("size"), SB_SLOT_SIZE);
    let (off, size, _) = find("ENTRY_OFF_HEADER_CRC");
    assert_eq!(off + size.expect("size"), ENTRY_HEADER_SIZE as u64);
    let (off, size, _) = find("CHUNK_OFF_CRC");
    assert_eq!(off + size.expect("size"), CHUNK_HEADER_SIZE as u64);
    let (off, size, _) = find("SB_SLOT_B_OFFSET");
    assert_eq!(off + size.expect("size"), WAL_OFFSET);
}

#[test]
fn inline_constant_mentions_match_the_code() {
    // Patterns like "64 (`ENTRY_HEADER_SIZE`)" or "0xFE (`KIND_PADDING`)".
    let mut checked = 0;
    for (i, _) in DOC.match_indices("(`") {
        let Some(end) = DOC[i + 2..].find('`') else {
            continue;
        };
        let name = &DOC[i + 2..i + 2 + end];
        if !DOC[i + 2 + end..].starts_with("`)")
            || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            continue;
        }
        let before = DOC[..i].trim_end();
        let start = before
            .rfind(|c: char| c.is_whitespace() || c == '|')
            .map_or(0, |p| p + 1);
        let Some(num) = parse_num(&before[start..]) else {
            continue;
        };
        let v = value_of(name)
            .unwrap_or_else(|| panic!("docs/format.md mentions unknown constant {name}"));
        assert_eq!(
            num, v,
            "docs/format.md says {name} is {num}, the code says {v}"
        );
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} inline constants found");
}

#[test]
fn documented_magics_match_the_code() {
    for (magic, what) in [
        (&SB_MAGIC[..], "superblock"),
        (&ENTRY_MAGIC_DISK[..], "ring entry"),
        (&ENTRY_MAGIC_WIRE[..], "wire entry"),
        (&CHUNK_MAGIC[..], "base chunk"),
    ] {
        let text = format!("`{}`", std::str::from_utf8(magic).expect("ascii magic"));
        assert!(
            DOC.contains(&text),
            "the {what} magic {text} is not documented"
        );
    }
    assert!(DOC.contains(&format!("The version field is {FORMAT_VERSION}")));
}
