//! Run-time SIMD selection (AVX-512, AVX2+FMA, NEON, portable fallback).
