//! Reference reduce ops (see the module docs of `reference`).
