//! The AVX-512 tier (F + BW + VL, with F16C): every format's 512-bit kernels.
