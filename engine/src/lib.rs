//! Sans-IO replica recovery core (work in progress).
