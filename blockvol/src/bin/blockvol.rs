//! `blockvol`: create, inspect and poke volume files.
//!
//! Exit codes (also in `--help`, see [`EXIT_CODES`]): 0 success (for `check` and `scrub`:
//! clean), 1 corruption found by `check`, `scrub` or `dump-wal`, 2 usage error or any failure
//! that is not corruption.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use blockvol::format::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, MIN_WAL_SIZE, WAL_SIZE_ALIGN, entry_size};
use blockvol::inspect::{Inspection, inspect};
use blockvol::{
    BlockVolError, CreateOptions, Lba, Lsn, OpenOptions, RetentionPolicy, UpgradeOutcome, Volume,
    upgrade_file,
};
use clap::{Parser, Subcommand};

/// The exit codes, printed by `--help` (of the program and of every command).
const EXIT_CODES: &str = "\
Exit codes:
  0  success (check, scrub: the file is clean)
  1  check, scrub or dump-wal found corruption: a damaged superblock slot or WAL entry, an
     extent block that fails its checksum, a file shorter than its superblock's geometry (a
     torn tail, where a crash cut the log short, is not corruption)
  2  usage error, or a failure that is not corruption: the path could not be opened or read (an
     I/O error, a directory, FIFO or device instead of a regular file, the volume locked by
     another process, no space to allocate it), or the operation was refused";

#[derive(Parser)]
#[command(
    name = "blockvol",
    about = "Create, inspect and poke blockvol volume files",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new, preallocated volume file
    ///
    /// The file and then its directory (the parent, or the current directory for a bare file
    /// name) are fsynced before the command succeeds.
    #[command(after_help = EXIT_CODES)]
    Create {
        path: PathBuf,
        /// Extent size in bytes: at least 1, a multiple of the block size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// WAL ring size in bytes: a multiple of 4096, at least 65536.
        #[arg(long = "wal-size", value_parser = parse_wal_size)]
        wal_size: u64,
        /// Block size in bytes: a power of two from 512 to 65536.
        #[arg(long = "block-size", default_value_t = 4096, value_parser = parse_block_size)]
        block_size: u32,
    },
    /// Print the superblock and WAL summary (read-only: never changes the file)
    #[command(after_help = EXIT_CODES)]
    Info {
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify every checksum (read-only); exit 0 clean, 1 corrupt, 2 error
    ///
    /// Opens the file read-only and never changes it. Damage (a bad superblock slot or WAL
    /// entry, an extent block that fails its checksum, a file shorter than its geometry) is
    /// corruption, exit 1; a torn tail (the end of a log cut short by a crash) is not.
    /// Anything else that fails is exit 2. A version 1 file has no extent checksums: its
    /// extent is not checked (run `blockvol upgrade`).
    #[command(after_help = EXIT_CODES)]
    Check { path: PathBuf },
    /// Verify every flushed extent block against its checksum (read-only); exit 0 clean, 1
    /// damaged, 2 error
    ///
    /// Opens the file read-only (recovery in memory, as `read`) and reads the whole extent,
    /// skipping blocks whose newest data is in the WAL (the WAL has its own checksums, which
    /// the open verified). Progress goes to stderr; the summary (blocks checked, damaged LBAs,
    /// duration) to stdout, as JSON with --json. A file whose WAL or superblocks are damaged
    /// (the open refuses it) is damaged too, exit 1; a version 1 file (no checksums) is an
    /// error, exit 2.
    #[command(after_help = EXIT_CODES)]
    Scrub {
        path: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert a version 1 file (no extent checksums) to the current format, in place
    ///
    /// Computes every block's checksum from the extent, appends the checksum region and then
    /// rewrites the superblocks with the new version; a crash before that last step leaves a
    /// valid version 1 file, and the command can simply run again. A current file is left
    /// untouched. The file must not be open elsewhere.
    #[command(after_help = EXIT_CODES)]
    Upgrade { path: PathBuf },
    /// Write whole blocks read from stdin at an LBA
    ///
    /// One write takes at most the blocks from the LBA to the end of the volume, and at most
    /// half the WAL: stdin is read only up to that (plus one byte), and more input is refused
    /// with an error, so an endless input (`cat /dev/zero |`) is not buffered.
    ///
    /// The volume stays writable however many writes follow: before exiting, `write` flushes
    /// the WAL into the extent (keeping the newest entries, up to half the WAL, for
    /// `dump-wal`), and it flushes before writing when the WAL has no room for the new entry.
    /// The write is therefore durable when the command succeeds.
    ///
    /// A sparse volume file (a `cp --sparse=always` copy) is fully allocated first; on a full
    /// file system that fails with "no space" and the file is left unchanged.
    #[command(after_help = EXIT_CODES)]
    Write {
        path: PathBuf,
        #[arg(long)]
        lba: u64,
        /// Sync the WAL right after the write (the final flush syncs it anyway).
        #[arg(long)]
        sync: bool,
    },
    /// Read blocks to stdout (read-only)
    ///
    /// Opens the file read-only and runs recovery in memory: the blocks are those a read-write
    /// open would recover, the file is never changed, and a read-only file or mount is fine.
    #[command(after_help = EXIT_CODES)]
    Read {
        path: PathBuf,
        /// First block to read.
        #[arg(long)]
        lba: u64,
        /// Number of blocks to read: at least 1.
        #[arg(long, value_parser = parse_blocks)]
        blocks: u64,
    },
    /// List WAL entries (read-only: never changes the file)
    ///
    /// Lists the entries recovery would replay, from the tail. If the log is corrupt (an entry
    /// that had been synced is damaged, or the log ends below what was synced), the good prefix
    /// is listed, a warning on stderr says where and why the walk stopped, and the exit code is
    /// 1. A torn tail (the unsynced end of the log a crash cut short) is not corruption.
    #[command(after_help = EXIT_CODES)]
    DumpWal {
        path: PathBuf,
        /// First LSN to list.
        #[arg(long)]
        from: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the xxh3-128 digest of the visible contents (read-only, as `read`)
    #[command(after_help = EXIT_CODES)]
    Digest { path: PathBuf },
}

// Argument parsers: values that can never be valid are refused while parsing, naming the
// option and the rule (cross-option rules, such as the size being a multiple of the block
// size, are the library's).

fn parse_u64(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|e| format!("{e} (expected a whole number)"))
}

fn parse_blocks(s: &str) -> Result<u64, String> {
    match parse_u64(s)? {
        0 => Err("must be at least 1: a read of zero blocks reads nothing".into()),
        n => Ok(n),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    match parse_u64(s)? {
        0 => Err("must be at least 1 byte (and a multiple of the block size)".into()),
        n => Ok(n),
    }
}

fn parse_wal_size(s: &str) -> Result<u64, String> {
    let n = parse_u64(s)?;
    if n < MIN_WAL_SIZE || !n.is_multiple_of(WAL_SIZE_ALIGN) {
        return Err(format!(
            "must be a multiple of {WAL_SIZE_ALIGN} and at least {MIN_WAL_SIZE} (64 KiB)"
        ));
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let n = s
        .parse::<u32>()
        .map_err(|e| format!("{e} (expected a whole number)"))?;
    if !n.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&n) {
        return Err(format!(
            "must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        ));
    }
    Ok(n)
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("blockvol: {msg}");
    ExitCode::from(2)
}

fn manual() -> OpenOptions {
    OpenOptions::manual()
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn info(path: &Path, json: bool) -> ExitCode {
    let ins = match inspect(path) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    let Some((slot, sb)) = &ins.chosen else {
        return fail("no valid superblock (run `blockvol check` for details)");
    };
    let wal = ins.wal.as_ref();
    let head = wal.map(|w| w.head).unwrap_or(sb.checkpoint);
    let slot_name = if *slot == 0 { "A" } else { "B" };
    if json {
        println!(
            "{{\"path\":{},\"format_version\":{},\"volume_id\":\"{}\",\"slot\":\"{slot_name}\",\"seq\":{},\"block_size\":{},\"volume_blocks\":{},\"volume_bytes\":{},\"wal_size\":{},\"generation\":{},\"checkpoint\":{},\"tail\":{},\"head\":{},\"entries\":{},\"epoch\":{},\"role\":{},\"install_incomplete\":{},\"repaired\":{},\"corrupt\":{}}}",
            json_str(&path.display().to_string()),
            sb.version,
            hex(&sb.volume_id),
            sb.seq,
            sb.block_size,
            sb.volume_blocks,
            sb.volume_blocks * u64::from(sb.block_size),
            sb.wal_size,
            sb.generation,
            sb.checkpoint,
            sb.tail_lsn,
            head,
            wal.map(|w| w.entries.len()).unwrap_or(0),
            sb.epoch,
            json_str(sb.role.name()),
            sb.flags & blockvol::format::SB_FLAG_INSTALL_INCOMPLETE != 0,
            sb.flags & blockvol::format::SB_FLAG_REPAIRED != 0,
            ins.is_corrupt(),
        );
    } else {
        println!("path:        {}", path.display());
        println!("volume id:   {}", hex(&sb.volume_id));
        if sb.has_checksums() {
            println!("format:      version {} (extent checksums)", sb.version);
        } else {
            println!(
                "format:      version {} (no extent checksums: opens read-only; run `blockvol upgrade`)",
                sb.version
            );
        }
        println!("superblock:  slot {slot_name}, seq {}", sb.seq);
        println!(
            "geometry:    {} blocks of {} bytes ({} bytes), WAL {} bytes",
            sb.volume_blocks,
            sb.block_size,
            sb.volume_blocks * u64::from(sb.block_size),
            sb.wal_size
        );
        println!("generation:  {}", sb.generation);
        println!(
            "lsns:        tail {} checkpoint {} head {}",
            sb.tail_lsn, sb.checkpoint, head
        );
        println!("role:        {} (epoch {})", sb.role.name(), sb.epoch);
        if sb.flags & blockvol::format::SB_FLAG_INSTALL_INCOMPLETE != 0 {
            println!(
                "state:       base install incomplete (target lsn {})",
                sb.install_lsn
            );
        }
        if sb.flags & blockvol::format::SB_FLAG_REPAIRED != 0 {
            println!("state:       repaired (checkpoint untrusted)");
        }
        if sb.flags & blockvol::format::SB_FLAG_INSTALL_INCOMPLETE == 0
            && sb.flush_mark > sb.checkpoint
        {
            println!(
                "flush mark:  {} (the extent may hold entries up to it; opening redoes that flush)",
                sb.flush_mark
            );
        }
        if ins.is_corrupt() {
            println!("corrupt:     yes (run `blockvol check` for details)");
        }
    }
    ExitCode::SUCCESS
}

fn report_check(path: &Path, ins: &Inspection) -> ExitCode {
    let mut corrupt = false;
    for (name, s) in ["A", "B"].iter().zip(ins.slots.iter()) {
        match &s.result {
            Ok(sb) => println!(
                "superblock slot {name} (offset {}): ok, seq {}",
                s.offset, sb.seq
            ),
            Err(e) => {
                corrupt = true;
                println!("superblock slot {name} (offset {}): CORRUPT: {e}", s.offset);
            }
        }
    }
    let Some((_, sb)) = &ins.chosen else {
        println!("{}: CORRUPT: no valid superblock", path.display());
        return ExitCode::from(1);
    };
    if let Some(e) = ins.file_too_short() {
        corrupt = true;
        println!("file: CORRUPT: {e}");
    }
    match &ins.wal {
        None => println!(
            "wal: not checked ({})",
            ins.wal_not_checked().unwrap_or_default()
        ),
        Some(w) => {
            println!(
                "wal: {} entries verified (lsn {}..={}), log ends at file offset {}: {}",
                w.entries.len(),
                sb.tail_lsn + 1,
                w.head,
                w.end_offset,
                w.end_detail
            );
            if w.leftovers > 0 && w.corruption.is_none() {
                println!(
                    "wal: {} torn-tail leftovers past the end (recovery discards them)",
                    w.leftovers
                );
            }
            if let Some(c) = &w.corruption {
                corrupt = true;
                println!("wal: CORRUPT: {c}");
            }
        }
    }
    let extent_skip = if !sb.has_checksums() {
        Some(format!(
            "format version {} has no extent checksums; run `blockvol upgrade`",
            sb.version
        ))
    } else if corrupt {
        Some("the file is damaged elsewhere".to_string())
    } else {
        ins.wal_not_checked()
    };
    match extent_skip {
        Some(why) => println!("extent: not checked ({why})"),
        None => match scrub(path, false) {
            Ok(r) if r.damaged.is_empty() => println!(
                "extent: {} blocks verified against their checksums ({} newer in the WAL)",
                r.checked, r.skipped
            ),
            Ok(r) => {
                corrupt = true;
                println!(
                    "extent: CORRUPT: {} of {} blocks fail their checksums: lba {}",
                    r.damaged.len(),
                    r.checked,
                    lba_list(&r.damaged, 20)
                );
            }
            Err(e) => return fail(e),
        },
    }
    if corrupt {
        println!("{}: CORRUPT", path.display());
        ExitCode::from(1)
    } else {
        println!("{}: clean", path.display());
        ExitCode::SUCCESS
    }
}

/// `lbas` as text, at most `max` of them.
fn lba_list(lbas: &[Lba], max: usize) -> String {
    let mut s: Vec<String> = lbas.iter().take(max).map(|l| l.to_string()).collect();
    if lbas.len() > max {
        s.push(format!("... ({} more)", lbas.len() - max));
    }
    s.join(", ")
}

/// Scrubs the whole extent through a read-only open, in steps, with progress on stderr when
/// `progress`.
fn scrub(path: &Path, progress: bool) -> blockvol::Result<blockvol::ScrubReport> {
    let v = Volume::open_read_only(path)?;
    let total = v.geometry().volume_blocks;
    let step = 4096u64;
    let mut report = blockvol::ScrubReport::default();
    let mut last_pct = u64::MAX;
    let mut lba = 0;
    while lba < total {
        let n = step.min(total - lba);
        let r = v.scrub_range(Lba(lba), n)?;
        report.checked += r.checked;
        report.skipped += r.skipped;
        report.damaged.extend(r.damaged);
        lba += n;
        let pct = lba * 100 / total;
        if progress && (pct / 5 != last_pct / 5 || lba == total) {
            last_pct = pct;
            eprintln!(
                "scrub: {lba}/{total} blocks ({pct}%), {} damaged",
                report.damaged.len()
            );
        }
    }
    v.close()?;
    Ok(report)
}

/// The largest number of damaged LBAs `scrub --json` lists (all are counted).
const SCRUB_JSON_MAX_LBAS: usize = 10_000;

fn scrub_cmd(path: &Path, json: bool) -> ExitCode {
    let started = std::time::Instant::now();
    let r = match scrub(path, true) {
        Ok(r) => r,
        Err(
            e @ (BlockVolError::Corrupt { .. }
            | BlockVolError::NoValidSuperblock { .. }
            | BlockVolError::FileTooShort { .. }),
        ) => {
            eprintln!("blockvol: CORRUPT: {e} (run `blockvol check` for details)");
            if json {
                println!(
                    "{{\"path\":{},\"clean\":false,\"error\":{}}}",
                    json_str(&path.display().to_string()),
                    json_str(&e.to_string())
                );
            }
            return ExitCode::from(1);
        }
        Err(e) => return fail(e),
    };
    let ms = started.elapsed().as_millis();
    if json {
        let lbas: Vec<String> = r
            .damaged
            .iter()
            .take(SCRUB_JSON_MAX_LBAS)
            .map(|l| l.to_string())
            .collect();
        println!(
            "{{\"path\":{},\"clean\":{},\"checked\":{},\"skipped\":{},\"damaged_count\":{},\"damaged\":[{}],\"damaged_truncated\":{},\"duration_ms\":{ms}}}",
            json_str(&path.display().to_string()),
            r.damaged.is_empty(),
            r.checked,
            r.skipped,
            r.damaged.len(),
            lbas.join(","),
            r.damaged.len() > SCRUB_JSON_MAX_LBAS,
        );
    } else if r.damaged.is_empty() {
        println!(
            "{}: clean: {} blocks verified ({} newer in the WAL) in {ms} ms",
            path.display(),
            r.checked,
            r.skipped
        );
    } else {
        println!(
            "{}: DAMAGED: {} of {} blocks fail their checksums: lba {}",
            path.display(),
            r.damaged.len(),
            r.checked,
            lba_list(&r.damaged, 100)
        );
    }
    if r.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn upgrade_cmd(path: &Path) -> ExitCode {
    match upgrade_file(path) {
        Ok(UpgradeOutcome::Upgraded {
            from_version,
            to_version,
            blocks,
            nonzero_blocks,
        }) => {
            println!(
                "{}: upgraded from format version {from_version} to {to_version}: {blocks} blocks checksummed ({nonzero_blocks} holding data)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Ok(UpgradeOutcome::AlreadyCurrent { version }) => {
            println!(
                "{}: already format version {version}; nothing changed",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn dump_wal(path: &Path, from: Option<u64>, json: bool) -> ExitCode {
    let ins = match inspect(path) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    if let Some(e) = ins.file_too_short() {
        eprintln!("blockvol: CORRUPT: {e}; the WAL was not read");
        return ExitCode::from(1);
    }
    let Some(w) = &ins.wal else {
        if ins.chosen.is_none() {
            eprintln!(
                "blockvol: CORRUPT: {}: no valid superblock (run `blockvol check` for details)",
                path.display()
            );
            return ExitCode::from(1);
        }
        return fail(format!(
            "no WAL to list: {}",
            ins.wal_not_checked().unwrap_or_default()
        ));
    };
    let from = from.unwrap_or(0);
    let items: Vec<_> = w.entries.iter().filter(|e| e.lsn >= from).collect();
    let mut out = std::io::stdout().lock();
    let r = (|| -> std::io::Result<()> {
        if json {
            write!(out, "[")?;
            for (i, e) in items.iter().enumerate() {
                if i > 0 {
                    write!(out, ",")?;
                }
                write!(
                    out,
                    "{{\"lsn\":{},\"kind\":\"{}\",\"epoch\":{},\"lba\":{},\"blocks\":{},\"content_crc\":\"{:08x}\",\"file_offset\":{}}}",
                    e.lsn, e.kind, e.epoch, e.lba, e.blocks, e.content_crc, e.file_offset
                )?;
            }
            writeln!(out, "]")?;
        } else {
            for e in &items {
                writeln!(
                    out,
                    "lsn {:>8}  {:<7}  epoch {:>4}  lba {:>10}  blocks {:>6}  crc {:08x}  offset {}",
                    e.lsn, e.kind, e.epoch, e.lba, e.blocks, e.content_crc, e.file_offset
                )?;
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        return fail(e);
    }
    if let Some(c) = &w.corruption {
        eprintln!(
            "blockvol: warning: the WAL is corrupt, the listing stops after lsn {}: {c}",
            w.head
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// Reads the blocks to write at `lba` from stdin: at most what one write there can take, plus
/// one byte to tell whether more input follows, so an endless input is refused, not buffered.
fn read_input(v: &Volume, lba: u64) -> Result<Vec<u8>, String> {
    let g = v.geometry();
    let bs = u64::from(g.block_size);
    if lba >= g.volume_blocks {
        return Err(format!(
            "lba {lba} is outside the volume of {} blocks",
            g.volume_blocks
        ));
    }
    let room = (g.volume_blocks - lba) * bs;
    let max = v.max_write_bytes();
    let limit = room.min(max);
    let mut data = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    if data.len() as u64 > limit {
        return Err(if room <= max {
            format!(
                "input does not fit: the volume holds {room} bytes ({} blocks) from lba {lba} to its end, and stdin has more",
                room / bs
            )
        } else {
            format!(
                "input is larger than the largest single write, {max} bytes ({} blocks: an entry takes at most half the {}-byte WAL); write it in parts at successive LBAs",
                max / bs,
                g.wal_size_bytes
            )
        });
    }
    Ok(data)
}

/// Writes `data` at `lba` and leaves the volume usable by the next command: nothing else
/// flushes a volume the command line writes (no background flusher outlives the process), so
/// without a flush every write would stay in the WAL until it filled and every later write
/// failed with "WAL full". The newest entries, up to half the WAL, stay for `dump-wal` (the
/// retention is soft: a write that needs their space gets it).
fn write_and_flush(v: Volume, lba: u64, data: &[u8], sync: bool) -> blockvol::Result<Lsn> {
    let r = (|| {
        let wal = v.geometry().wal_size_bytes;
        v.set_retention(RetentionPolicy {
            keep_entries: 0,
            keep_bytes: wal / 2,
        });
        // Under pressure (no room for the entry and the padding it may need), flush first: the
        // writer's own wait can only reuse space up to the checkpoint, and entries left
        // unflushed (by an interrupted command, or by another program) hold it back.
        let s = v.status();
        let need = entry_size(data.len() as u64).saturating_mul(2);
        if s.wal_size_bytes - s.wal_used_bytes < need {
            v.force_flush()?;
        }
        let lsn = v.write(Lba(lba), data)?;
        if sync {
            v.sync()?;
        }
        v.force_flush()?;
        Ok(lsn)
    })();
    // Close (final superblock) even after a failure; the first error wins.
    let c = v.close();
    let lsn = r?;
    c?;
    Ok(lsn)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.cmd {
        Cmd::Create {
            path,
            size,
            wal_size,
            block_size,
        } => {
            let opts = CreateOptions {
                volume_size_bytes: size,
                wal_size_bytes: wal_size,
                block_size,
            };
            match Volume::create(&path, &opts, &manual()).and_then(|v| v.close()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Info { path, json } => info(&path, json),
        Cmd::Check { path } => match inspect(&path) {
            Ok(ins) => report_check(&path, &ins),
            Err(e) => fail(e),
        },
        Cmd::Write { path, lba, sync } => {
            let v = match Volume::open(&path, &manual()) {
                Ok(v) => v,
                Err(e) => return fail(e),
            };
            let data = match read_input(&v, lba) {
                Ok(d) => d,
                Err(msg) => {
                    let _ = v.close();
                    return fail(msg);
                }
            };
            match write_and_flush(v, lba, &data, sync) {
                Ok(lsn) => {
                    eprintln!("wrote {} bytes at lba {lba} as lsn {lsn}", data.len());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Read { path, lba, blocks } => {
            let r = Volume::open_read_only(&path).and_then(|v| {
                let d = v.read(Lba(lba), blocks)?;
                v.close()?;
                Ok(d)
            });
            match r {
                Ok(d) => match std::io::stdout().lock().write_all(&d) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(e),
                },
                Err(e) => fail(e),
            }
        }
        Cmd::DumpWal { path, from, json } => dump_wal(&path, from, json),
        Cmd::Scrub { path, json } => scrub_cmd(&path, json),
        Cmd::Upgrade { path } => upgrade_cmd(&path),
        Cmd::Digest { path } => {
            let r = Volume::open_read_only(&path).and_then(|v| {
                let d = v.digest()?;
                v.close()?;
                Ok(d)
            });
            match r {
                Ok(d) => {
                    println!("{d}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}
