//! Deterministic simulation of a primary, replicas and faults (issue 6): not written yet.
