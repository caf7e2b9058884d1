//! WAL pin records (the `WalPin`s and scans of `scan.rs` own one each) and their revocation.

use super::state::{PinRec, State};
use super::{Shared, Volume};
use crate::error::{BlockVolError, Result};
use crate::types::Lsn;

impl Shared {
    /// Registers a WAL pin keeping entries `> after` (caller holds the state lock).
    pub(crate) fn add_pin(&self, st: &mut State, after: u64) -> Result<u64> {
        let floor = st.tail.max(st.tail_moving_to.unwrap_or(0));
        if after < floor {
            return Err(BlockVolError::Recycled {
                requested: Lsn(after + 1),
                retained_start: Lsn(floor + 1),
            });
        }
        st.next_pin_id += 1;
        let id = st.next_pin_id;
        st.pins.insert(
            id,
            PinRec {
                after,
                revoked: false,
            },
        );
        Ok(id)
    }

    pub(crate) fn remove_pin(&self, id: u64) {
        let mut st = self.lock_state();
        st.pins.remove(&id);
        self.wake_flusher(&mut st);
        self.cond.notify_all();
    }

    pub(crate) fn pin_revoked(&self, id: u64) -> bool {
        let st = self.lock_state();
        st.pins.get(&id).is_none_or(|p| p.revoked)
    }
}

impl Volume {
    /// Revokes every live pin (WAL pins, scan pins, base pins): they stop holding the tail and
    /// the flusher. Returns how many were revoked.
    pub fn revoke_wal_pins(&self, reason: &str) -> usize {
        let s = &self.shared;
        let n = {
            let mut st = s.lock_state();
            let mut n = 0;
            for p in st.pins.values_mut().filter(|p| !p.revoked) {
                p.revoked = true;
                n += 1;
            }
            for f in st.fences.values_mut().filter(|f| !f.revoked) {
                f.revoked = true;
                n += 1;
            }
            st.revoke_reason = reason.to_string();
            s.wake_flusher(&mut st);
            s.cond.notify_all();
            n
        };
        log::warn!("revoked {n} pins: {reason}");
        if let Err(e) = s.persist_progress(None) {
            log::warn!("tail move after revoking pins failed: {e}");
        }
        n
    }
}
