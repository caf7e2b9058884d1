//! A volume server's Prometheus metrics (`/metrics`, the OpenMetrics text format, through the
//! `prometheus-client` crate, D44).
//!
//! Two kinds: what the NBD frontend measures as it serves (per volume: reads, writes and
//! flushes with their latency histograms and bytes, failed requests, failed flushes), kept for
//! the life of the process in [`IoMetrics`]; and what the volumes report about themselves
//! (LSNs, lease, WAL use, per replica lag, shipped entries, recoveries by path, rebuild bytes),
//! read from the node's inventory at each scrape.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::node::VolumeInfo;

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. about 6.5 s: a cached read to a flush that waits out a slow replica.
    Histogram::new(exponential_buckets(50e-6, 2.0, 18))
}

fn volume(name: &str) -> Labels {
    vec![("volume", name.to_owned())]
}

/// The kinds of request the frontend counts.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read.
    Read,
    /// A write (also write-zeroes and trim: requests that change the volume).
    Write,
    /// A flush (also a FUA write's durability).
    Flush,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

/// What the frontend measured, per volume, since the process started.
#[derive(Debug)]
pub struct IoMetrics {
    latency: [Histograms; 3],
    bytes: [Family<Labels, Counter>; 2],
    errors: Family<Labels, Counter>,
}

impl Default for IoMetrics {
    fn default() -> Self {
        let h = || Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        IoMetrics {
            latency: [h(), h(), h()],
            bytes: [Family::default(), Family::default()],
            errors: Family::default(),
        }
    }
}

impl IoMetrics {
    /// Records one request of `op` on `vol` that took `took`, moved `bytes` and succeeded or
    /// not. A failed request counts as an error, not in the latency histogram.
    pub fn record(&self, vol: &str, op: Op, took: Duration, bytes: u64, ok: bool) {
        if !ok {
            let mut l = volume(vol);
            l.push(("op", op.as_str().to_owned()));
            self.errors.get_or_create(&l).inc();
            return;
        }
        let l = volume(vol);
        self.latency[op as usize]
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if let Some(c) = self.bytes.get(op as usize)
            && bytes > 0
        {
            c.get_or_create(&l).inc_by(bytes);
        }
    }

    fn register(&self, reg: &mut Registry) {
        let [r, w, f] = self.latency.clone();
        reg.register(
            "swblock_read_latency_seconds",
            "Time to serve a read through the frontend (count: reads served).",
            r,
        );
        reg.register(
            "swblock_write_latency_seconds",
            "Time to accept a write, write-zeroes or trim (count: writes served).",
            w,
        );
        reg.register(
            "swblock_flush_latency_seconds",
            "Time until a flush was acknowledged under the volume's durability mode (count: \
             flushes acknowledged).",
            f,
        );
        let [rb, wb] = self.bytes.clone();
        reg.register("swblock_read_bytes", "Bytes read through the frontend.", rb);
        reg.register(
            "swblock_write_bytes",
            "Bytes written through the frontend.",
            wb,
        );
        reg.register(
            "swblock_request_errors",
            "Requests that failed, by op; failed flushes include every flush whose durability \
             the mode could not prove (a replica down under sync_all, a failed barrier, an \
             expired lease).",
            self.errors.clone(),
        );
    }
}

fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

/// The OpenMetrics text of a volume server: `io` plus what `inventory` reports.
pub fn render(io: &IoMetrics, inventory: &[VolumeInfo]) -> String {
    let mut reg = Registry::default();
    io.register(&mut reg);
    let head = gauge_family();
    let committed = gauge_family();
    let checkpoint = gauge_family();
    let epoch = gauge_family();
    let lease = gauge_family();
    let wal_used = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let lag = gauge_family();
    let durable = gauge_family();
    let shipped = Family::<Labels, Counter>::default();
    let recoveries = Family::<Labels, Counter>::default();
    let rebuild_bytes = Family::<Labels, Counter>::default();
    let barriers = Family::<Labels, Counter>::default();
    let scrub_damaged = gauge_family();
    let scrub_last = gauge_family();
    let scrub_found = Family::<Labels, Counter>::default();
    let scrub_repaired = Family::<Labels, Counter>::default();
    let scrub_passes = Family::<Labels, Counter>::default();
    let checksum_errors = Family::<Labels, Counter>::default();
    for v in inventory {
        let l = volume(&v.name);
        let as_i64 = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        head.get_or_create(&l).set(as_i64(v.head));
        committed.get_or_create(&l).set(as_i64(v.committed));
        checkpoint.get_or_create(&l).set(as_i64(v.checkpoint));
        epoch.get_or_create(&l).set(as_i64(v.epoch));
        lease.get_or_create(&l).set(i64::from(v.has_lease));
        let used = if v.wal_size_bytes == 0 {
            0.0
        } else {
            v.wal_used_bytes as f64 / v.wal_size_bytes as f64
        };
        wal_used.get_or_create(&l).set(used);
        scrub_damaged.get_or_create(&l).set(as_i64(v.scrub.damaged));
        scrub_last
            .get_or_create(&l)
            .set(as_i64(v.scrub.last_pass_unix));
        scrub_found.get_or_create(&l).inc_by(v.scrub.found);
        scrub_repaired.get_or_create(&l).inc_by(v.scrub.repaired);
        scrub_passes.get_or_create(&l).inc_by(v.scrub.passes);
        checksum_errors.get_or_create(&l).inc_by(v.checksum_errors);
        for r in &v.replica_states {
            let mut rl = l.clone();
            rl.push(("replica", r.id.clone()));
            lag.get_or_create(&rl)
                .set(as_i64(v.head.saturating_sub(r.durable.0)));
            durable.get_or_create(&rl).set(as_i64(r.durable.0));
            shipped.get_or_create(&rl).inc_by(r.streamed);
            rebuild_bytes.get_or_create(&rl).inc_by(r.base_bytes_sent);
            barriers.get_or_create(&rl).inc_by(r.barriers);
            for (path, n) in [
                ("catch_up", r.catch_ups),
                ("truncate", r.truncations),
                ("rebuild", r.rebuilds),
            ] {
                let mut pl = rl.clone();
                pl.push(("path", path.to_owned()));
                recoveries.get_or_create(&pl).inc_by(n);
            }
        }
    }
    reg.register("swblock_volume_head_lsn", "Last LSN in the WAL.", head);
    reg.register(
        "swblock_volume_committed_lsn",
        "Highest LSN the durability mode proved.",
        committed,
    );
    reg.register(
        "swblock_volume_checkpoint_lsn",
        "Highest LSN flushed to the extent.",
        checkpoint,
    );
    reg.register("swblock_volume_epoch", "The volume's epoch.", epoch);
    reg.register(
        "swblock_volume_has_lease",
        "1 when this server is the volume's primary with a valid lease.",
        lease,
    );
    reg.register(
        "swblock_scrub_damaged_blocks",
        "Blocks of this copy the last scrub of their range found damaged and nothing repaired.",
        scrub_damaged,
    );
    reg.register(
        "swblock_scrub_last_pass_unix_seconds",
        "When the last complete scrub pass over this copy ended (0: never).",
        scrub_last,
    );
    reg.register(
        "swblock_scrub_found_blocks",
        "Damaged blocks scrubs found on this copy (since the volume was opened).",
        scrub_found,
    );
    reg.register(
        "swblock_scrub_repaired_blocks",
        "Blocks of this copy repaired from a peer's copy (since the volume was opened).",
        scrub_repaired,
    );
    reg.register(
        "swblock_scrub_passes",
        "Complete scrub passes over this copy (since the volume was opened).",
        scrub_passes,
    );
    reg.register(
        "swblock_checksum_errors",
        "Extent blocks that failed their checksum on any read (since the volume was opened).",
        checksum_errors,
    );
    reg.register(
        "swblock_wal_used_ratio",
        "Fraction of the WAL ring in use.",
        wal_used,
    );
    reg.register(
        "swblock_replica_lag_entries",
        "Entries a replica's durable point is behind the primary's head.",
        lag,
    );
    reg.register(
        "swblock_replica_durable_lsn",
        "The last LSN a replica reported durable.",
        durable,
    );
    reg.register(
        "swblock_replica_shipped_entries",
        "Entries the live stream shipped to a replica (since this primary's replicator started).",
        shipped,
    );
    reg.register(
        "swblock_replica_barriers",
        "Durability barriers a replica answered (since this primary's replicator started).",
        barriers,
    );
    reg.register(
        "swblock_recoveries",
        "Recoveries completed, by path (since this primary's replicator started).",
        recoveries,
    );
    reg.register(
        "swblock_rebuild_bytes",
        "Image bytes rebuilds sent a replica (since this primary's replicator started).",
        rebuild_bytes,
    );
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &reg) {
        log::warn!("metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvol::Lsn;
    use controlbridge::BlockRole;
    use transport::stream::{DurabilityMode, ReplicaStatus, StreamState};

    fn info() -> VolumeInfo {
        VolumeInfo {
            name: "v1".into(),
            path: "v1.vol".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
            epoch: 3,
            role: BlockRole::Primary,
            head: 120,
            committed: 110,
            checkpoint: 100,
            has_lease: true,
            lease_left_ms: 2500,
            wal_used_bytes: 1 << 18,
            wal_size_bytes: 1 << 20,
            pins: 1,
            mode: DurabilityMode::SyncAll,
            replicas: vec![("v1/vs2".into(), "127.0.0.1:1".into())],
            replica_degraded: false,
            needs_rebuild: false,
            replica_states: vec![ReplicaStatus {
                id: "v1/vs2".into(),
                state: StreamState::Streaming,
                shipped: Lsn(120),
                durable: Lsn(115),
                joins: 2,
                recoveries: 2,
                duplicates: 0,
                streamed: 40,
                batches: 10,
                barriers: 7,
                barrier_micros: 0,
                apply_micros: 0,
                base_bytes_sent: 8192,
                base_bytes_resumed: 0,
                catch_ups: 1,
                truncations: 0,
                rebuilds: 1,
                last_path: "catch_up",
                recovery: None,
            }],
            scrub: v2bridge::ScrubStats {
                damaged: 1,
                found: 3,
                repaired: 2,
                passes: 4,
                last_pass_unix: 1_790_000_000,
            },
            checksum_errors: 6,
            acks: Vec::new(),
        }
    }

    #[test]
    fn the_text_carries_requests_latencies_and_what_the_volumes_report() {
        let io = IoMetrics::default();
        io.record("v1", Op::Write, Duration::from_micros(300), 4096, true);
        io.record("v1", Op::Write, Duration::from_millis(3), 8192, true);
        io.record("v1", Op::Flush, Duration::from_millis(2), 0, true);
        io.record("v1", Op::Flush, Duration::from_millis(2), 0, false);
        io.record("v1", Op::Read, Duration::from_micros(80), 512, true);
        let text = render(&io, &[info()]);
        for want in [
            "swblock_write_latency_seconds_count{volume=\"v1\"} 2",
            "swblock_write_latency_seconds_sum{volume=\"v1\"} 0.0033",
            "swblock_flush_latency_seconds_count{volume=\"v1\"} 1",
            "swblock_read_latency_seconds_count{volume=\"v1\"} 1",
            // 80 µs is above the first bucket (50 µs) and within the second (100 µs).
            "swblock_read_latency_seconds_bucket{le=\"0.0001\",volume=\"v1\"} 1",
            "swblock_read_latency_seconds_bucket{le=\"0.00005\",volume=\"v1\"} 0",
            "swblock_write_bytes_total{volume=\"v1\"} 12288",
            "swblock_request_errors_total{volume=\"v1\",op=\"flush\"} 1",
            "swblock_volume_head_lsn{volume=\"v1\"} 120",
            "swblock_volume_committed_lsn{volume=\"v1\"} 110",
            "swblock_volume_epoch{volume=\"v1\"} 3",
            "swblock_volume_has_lease{volume=\"v1\"} 1",
            "swblock_wal_used_ratio{volume=\"v1\"} 0.25",
            "swblock_replica_lag_entries{volume=\"v1\",replica=\"v1/vs2\"} 5",
            "swblock_replica_shipped_entries_total{volume=\"v1\",replica=\"v1/vs2\"} 40",
            "swblock_recoveries_total{volume=\"v1\",replica=\"v1/vs2\",path=\"rebuild\"} 1",
            "swblock_recoveries_total{volume=\"v1\",replica=\"v1/vs2\",path=\"truncate\"} 0",
            "swblock_rebuild_bytes_total{volume=\"v1\",replica=\"v1/vs2\"} 8192",
            "swblock_scrub_damaged_blocks{volume=\"v1\"} 1",
            "swblock_scrub_found_blocks_total{volume=\"v1\"} 3",
            "swblock_scrub_repaired_blocks_total{volume=\"v1\"} 2",
            "swblock_scrub_passes_total{volume=\"v1\"} 4",
            "swblock_scrub_last_pass_unix_seconds{volume=\"v1\"} 1790000000",
            "swblock_checksum_errors_total{volume=\"v1\"} 6",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
