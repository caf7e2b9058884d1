//! The NBD frontend of a volume server: every volume this server is the leased primary of is an
//! export under its name. Each request passes the node's gate first (a replica, a fenced
//! primary or one whose lease ran out gets `EPERM`), a flush (and FUA) means the volume's
//! durability mode (the replicator's flush, which also withholds the acknowledgement if the
//! lease ran out meanwhile), and writes wake the volume's shippers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::metrics::Op;

use crate::nbd::{
    BlockDevice, DeviceError, DeviceHook, ExportError, Exports, NbdConfig, NbdServer,
    NbdServerError, VolumeDevice,
};
use crate::node::{Node, NodeError};

fn device_error(e: NodeError) -> DeviceError {
    match e {
        NodeError::NotServing { .. } | NodeError::Stale { .. } | NodeError::UnknownVolume(_) => {
            DeviceError::NotPermitted(e.to_string())
        }
        NodeError::Invalid(_) => DeviceError::Invalid(e.to_string()),
        NodeError::Storage(_) | NodeError::Flush(_) => DeviceError::Io(e.to_string()),
    }
}

/// A primary's volume as an NBD device.
struct PrimaryDevice {
    inner: VolumeDevice,
    node: Arc<Node>,
    name: String,
}

impl PrimaryDevice {
    /// Runs `f` as one request of `op` moving `bytes`, timed and counted.
    fn measured(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let start = Instant::now();
        let r = f();
        self.node
            .io_metrics()
            .record(&self.name, op, start.elapsed(), bytes, r.is_ok());
        r
    }
}

impl BlockDevice for PrimaryDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let n = buf.len() as u64;
        self.measured(Op::Read, n, || self.inner.read(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let r = self.measured(Op::Write, data.len() as u64, || {
            self.inner.write(offset, data, false)
        });
        self.node.notify(&self.name);
        r?;
        // FUA: the write's durability is a flush under the volume's mode, measured as one.
        if fua { self.flush() } else { Ok(()) }
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.measured(Op::Flush, 0, || self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let r = self.measured(Op::Write, 0, || self.inner.trim(offset, len));
        self.node.notify(&self.name);
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        let r = self.measured(Op::Write, 0, || self.inner.write_zeroes(offset, len, false));
        self.node.notify(&self.name);
        r?;
        if fua { self.flush() } else { Ok(()) }
    }

    fn flush_covers_all_connections(&self) -> bool {
        // One volume, one WAL: a flush makes every completed write durable, whoever wrote it.
        true
    }
}

/// The node's leased primaries, as NBD exports. Every connection to a volume shares one device
/// (its range lock serializes read-modify-writes across connections) for as long as the volume
/// file is the same.
pub struct NodeExports {
    node: Arc<Node>,
    devices: Mutex<HashMap<String, Arc<PrimaryDevice>>>,
}

impl NodeExports {
    /// Exports of `node`.
    pub fn new(node: Arc<Node>) -> Self {
        NodeExports {
            node,
            devices: Mutex::new(HashMap::new()),
        }
    }
}

impl Exports for NodeExports {
    fn list(&self) -> Vec<String> {
        self.node
            .inventory()
            .into_iter()
            .filter(|v| v.has_lease)
            .map(|v| v.name)
            .collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError> {
        let (vol, _) = self.node.primary(name).map_err(|e| match e {
            NodeError::UnknownVolume(n) => ExportError::Unknown(n),
            other => ExportError::Refused {
                name: name.to_owned(),
                reason: other.to_string(),
            },
        })?;
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = devices.get(name)
            && Arc::ptr_eq(d.inner.volume(), &vol)
        {
            return Ok(Arc::clone(d) as Arc<dyn BlockDevice>);
        }
        let (n1, v1) = (Arc::clone(&self.node), name.to_owned());
        let flush: DeviceHook = Arc::new(move || n1.flush(&v1).map(|_| ()).map_err(device_error));
        let (n2, v2) = (Arc::clone(&self.node), name.to_owned());
        let gate: DeviceHook = Arc::new(move || n2.check_io(&v2).map_err(device_error));
        let device = Arc::new(PrimaryDevice {
            inner: VolumeDevice::with_flush(vol, flush).gated(gate),
            node: Arc::clone(&self.node),
            name: name.to_owned(),
        });
        devices.insert(name.to_owned(), Arc::clone(&device));
        Ok(device)
    }
}

/// Starts the node's NBD server on `addr`: loopback only unless `allow_remote` (NBD has no
/// authentication here).
pub fn start_nbd(
    node: Arc<Node>,
    addr: SocketAddr,
    allow_remote: bool,
) -> Result<NbdServer, NbdServerError> {
    let config = NbdConfig {
        allow_remote,
        ..NbdConfig::default()
    };
    NbdServer::start(addr, config, Arc::new(NodeExports::new(node)))
}
