//! Plain sequential SSD recurrence (Mamba-2).
