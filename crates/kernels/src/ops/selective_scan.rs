//! The Mamba-1 selective scan (S6): forward and backward.
