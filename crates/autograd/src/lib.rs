//! nibble autograd (work in progress).
