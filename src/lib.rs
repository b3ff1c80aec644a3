//! latchkey: lease-based named locks kept in Redis, served over gRPC.
//!
//! # Layout
//! A request flows down this list and its answer back up:
//! - [`config`]: every setting (flag, environment variable, default, limit) in one place.
//! - [`server`]: the tonic server: services, health, reflection, shutdown.
//! - [`grpc`]: the edge: proto messages -> validated requests, errors -> `Status`.
//! - [`lock`]: the lock engine: acquire/wait, release, extend, inspect, holds; its Redis
//!   scripts (`src/lock/*.lua`) and its pub/sub waiter dispatch.
//! - [`stock`]: the stock engine (locks -> transaction -> commit -> unlock) and its SQL
//!   (`migrations/`, SQLite or PostgreSQL).
//! - [`telemetry`]: logs and the names of every metric.
#![forbid(unsafe_code)]

pub mod config;
pub mod grpc;
pub mod lock;
pub mod server;
pub mod stock;
pub mod telemetry;
