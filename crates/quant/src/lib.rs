//! nibble quant (work in progress).
