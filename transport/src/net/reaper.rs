//! Things kept alive until a deadline, then dropped by one background thread: the leases of a
//! connection that broke (so a puller that reconnects finds its image still pinned) and images
//! a failed rebuild let go of (so the next attempt can resume against the same image).
//!
//! The thread sleeps until the earliest deadline (no polling) and drops each item at its
//! deadline; dropping the reaper drops everything it still holds at once.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

type Item = Box<dyn Send>;

struct State {
    items: Vec<(Instant, Item)>,
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    cv: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holds items until their deadlines.
pub(crate) struct Reaper {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// A reaper with its thread, named `name`.
    pub(crate) fn start(name: &str) -> std::io::Result<Reaper> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                items: Vec::new(),
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let i2 = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&i2))?;
        Ok(Reaper {
            inner,
            thread: Some(thread),
        })
    }

    /// Keeps `item` alive until `until`.
    pub(crate) fn hold(&self, until: Instant, item: Item) {
        let mut st = self.inner.lock();
        if st.stop {
            return; // dropped here, at once
        }
        st.items.push((until, item));
        self.inner.cv.notify_all();
    }

    /// Drops everything held now; returns how many.
    pub(crate) fn release_all(&self) -> usize {
        let items = std::mem::take(&mut self.inner.lock().items);
        items.len()
    }

    /// How many items are held.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().items.len()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let items = {
            let mut st = self.inner.lock();
            st.stop = true;
            self.inner.cv.notify_all();
            std::mem::take(&mut st.items)
        };
        drop(items);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        if st.stop {
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut i = 0;
        while i < st.items.len() {
            if st.items[i].0 <= now {
                due.push(st.items.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if !due.is_empty() {
            // Dropped without the lock: an item's drop may take other locks (a volume's).
            drop(st);
            drop(due);
            st = inner.lock();
            continue;
        }
        st = match st.items.iter().map(|(d, _)| *d).min() {
            Some(next) => {
                inner
                    .cv
                    .wait_timeout(st, next.saturating_duration_since(now))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => inner.cv.wait(st).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn items_are_dropped_at_their_deadlines_and_all_on_drop() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let r = Reaper::start("reaper-test").unwrap();
        let now = Instant::now();
        r.hold(
            now + Duration::from_millis(50),
            Box::new(Counted(dropped.clone())),
        );
        r.hold(
            now + Duration::from_secs(600),
            Box::new(Counted(dropped.clone())),
        );
        assert_eq!(r.len(), 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the first deadline passed"
        );
        assert_eq!(r.len(), 1, "the second is still held");
        drop(r);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "dropping the reaper drops the rest"
        );
    }

    #[test]
    fn release_all_drops_at_once() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let r = Reaper::start("reaper-test").unwrap();
        r.hold(
            Instant::now() + Duration::from_secs(600),
            Box::new(Counted(dropped.clone())),
        );
        assert_eq!(r.release_all(), 1);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(r.len(), 0);
    }
}
