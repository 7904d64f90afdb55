//! CPU chunked SSD (Mamba-2).
