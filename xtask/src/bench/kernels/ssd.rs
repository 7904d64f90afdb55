//! The Mamba-2 SSD scan and block.
