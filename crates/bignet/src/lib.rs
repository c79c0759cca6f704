//! nibble bignet (work in progress).
