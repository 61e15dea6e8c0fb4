//! Live-migration support: dirty-page logging and ring/device state hand-over.
//!
//! Not implemented yet: vhost-relay does not offer `VHOST_F_LOG_ALL` or
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, so QEMU refuses to migrate a guest attached to it (it
//! says so rather than migrating with memory the backend wrote unlogged). Guest memory is
//! already written only through vm-memory with vhost-user-backend's log bitmap type, which is
//! the base this crate builds on.
