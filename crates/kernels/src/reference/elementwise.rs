//! Reference elementwise ops (see the module docs of `reference`).
