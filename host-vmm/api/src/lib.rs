//! The control API of a running Tandem VM: REST/JSON over a Unix socket.
//!
//! This crate is the contract between `tandem run` (the server, in
//! `tandem-vmm`) and every client (`tandem info|pause|resume|shutdown`,
//! tests, operators' scripts): the request and response types, the routes,
//! and a small client. `openapi.yaml` beside this file documents the same
//! routes for other languages; a test keeps the two in step.
#![forbid(unsafe_code)]

pub mod channel;
pub mod client;
pub mod types;

pub use client::{Client, ClientError};
pub use types::*;

/// Route paths, relative to the socket. Versioned like Cloud Hypervisor's.
pub mod routes {
    pub const PING: &str = "/api/v1/vmm.ping";
    pub const VM_INFO: &str = "/api/v1/vm.info";
    pub const VM_PAUSE: &str = "/api/v1/vm.pause";
    pub const VM_RESUME: &str = "/api/v1/vm.resume";
    pub const VM_SHUTDOWN: &str = "/api/v1/vm.shutdown";
    /// Saves the VM to a file and stops it (`tandem run --restore` brings it back).
    pub const VM_SNAPSHOT: &str = "/api/v1/vm.snapshot";
    /// Live-migrates the VM to a `tandem run --incoming` elsewhere.
    pub const VM_MIGRATE: &str = "/api/v1/vm.migrate";
    pub const CHANNEL_INFO: &str = "/api/v1/channel.info";
    pub const CHANNEL_PING: &str = "/api/v1/channel.ping";
    pub const CHANNEL_INJECT: &str = "/api/v1/channel.inject";
    pub const DEVICE_LIST: &str = "/api/v1/device.list";
    pub const DEVICE_ATTACH: &str = "/api/v1/device.attach";
    pub const DEVICE_DETACH: &str = "/api/v1/device.detach";
    /// Asks the guest driver to quiesce, resume or report an attached
    /// function, or to apply the host's policy to it (F6).
    pub const DEVICE_GUEST: &str = "/api/v1/device.guest";
    /// Every route with its method, for the OpenAPI check.
    pub const ALL: &[(&str, &str)] = &[
        ("get", PING),
        ("get", VM_INFO),
        ("put", VM_PAUSE),
        ("put", VM_RESUME),
        ("put", VM_SHUTDOWN),
        ("put", VM_SNAPSHOT),
        ("put", VM_MIGRATE),
        ("get", CHANNEL_INFO),
        ("put", CHANNEL_PING),
        ("put", CHANNEL_INJECT),
        ("get", DEVICE_LIST),
        ("put", DEVICE_ATTACH),
        ("put", DEVICE_DETACH),
        ("put", DEVICE_GUEST),
    ];
}
