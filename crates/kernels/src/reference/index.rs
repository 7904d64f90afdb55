//! Reference index ops (see the module docs of `reference`).
