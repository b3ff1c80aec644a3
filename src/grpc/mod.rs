//! The gRPC edge: decodes proto messages into validated, typed requests, calls the engines, and
//! maps their errors to `Status` (in `status`, and only there).
//!
//! Nothing below this module sees a proto type.

pub mod codec;
mod deadline;
mod lock;
mod status;
mod stock;

use std::time::Duration;

pub use lock::LockApi;
pub use status::InvalidArgument;
pub use stock::StockApi;

/// Generated protobuf and gRPC code for `proto/latchkey/v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("latchkey.v1");

    /// The file descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("latchkey_descriptor");
}

/// A proto Duration as a std one: negative or denormalized values are refused, naming `field`.
fn duration(
    raw: Option<prost_types::Duration>,
    field: &str,
) -> Result<Option<Duration>, InvalidArgument> {
    let Some(d) = raw else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(InvalidArgument::new(field, "must not be negative"));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(InvalidArgument::new(
            field,
            "nanos must be below 1000000000",
        ));
    }
    // Both checked non-negative above.
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// A std Duration as a proto one (saturating: our durations are far below i64 seconds).
fn to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}
