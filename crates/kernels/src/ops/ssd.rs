//! The Mamba-2 SSD (state-space duality) scan: chunked forward and backward.
